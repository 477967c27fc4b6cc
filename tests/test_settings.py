"""Flags and TOML keys come from one declaration (config.SETTINGS), so they cannot drift."""

from __future__ import annotations

import pytest

from ofmipd import cli
from ofmipd.config import (
    SETTINGS,
    Config,
    ConfigError,
    Listen,
    Setting,
    from_flags,
    from_mapping,
    merge,
    validate,
)

# Config fields that deliberately lack a flag or a TOML key, and why.
FLAG_ONLY = {"log"}  # -L: stderr logging, for an inetd or tcpserver command line
TOML_ONLY = {"rule_tables"}  # [[rule]] tables; the command line has --rules FILE
NOT_DECLARED = {
    "auth",  # auth_backends' flags (-a, -R ...) and [[auth]] tables
    "ratelimit_options",  # the rest of a [ratelimit] table, checked by the limiter; no flag
    "source",  # where the configuration came from
}


def with_flags() -> set[str]:
    return {s.field for s in SETTINGS if s.field and s.flags}


def with_toml() -> set[str]:
    return {s.field for s in SETTINGS if s.field and s.toml}


def test_every_config_field_has_a_flag_and_a_toml_key_or_a_reason() -> None:
    fields = set(Config._fields)
    assert fields - with_flags() == TOML_ONLY | NOT_DECLARED
    assert fields - with_toml() == FLAG_ONLY | NOT_DECLARED
    assert with_flags() | with_toml() <= fields  # no declaration names a field Config lacks


def test_each_flag_has_one_long_form_last() -> None:
    # Setting.dest is made from the last flag; argparse's own rule takes the first long
    # one. Both agree only while every setting has exactly one long flag, given last.
    for setting in SETTINGS:
        if setting.flags:
            longs = [flag for flag in setting.flags if flag.startswith("--")]
            assert longs == [setting.flags[-1]], setting


def example(setting: Setting) -> tuple[list[str], object]:
    """A value that is not the default: the flag's arguments and the same in TOML."""
    if setting.value_type is bool:
        value = True if setting.const is None else setting.const
        return [], value
    if setting.choices:
        return [setting.choices[-1]], setting.choices[-1]
    if setting.metavar == "KIND:LIMIT/WINDOW":  # --quota and [[quota]] tables
        return ["user-messages:5/1h"], [{"kind": "user-messages", "limit": 5, "window": "1h"}]
    text = {int: "7", float: "2.5"}.get(setting.value_type, "/srv/example")
    if "HOST:PORT" in (setting.metavar or ""):
        text = "[::1]:2525"
    elif "CIDR" in (setting.metavar or ""):
        text = "10.0.0.0/8,192.0.2.0/24"
    return [text], setting.value_type(text)


def toml_document(path: str, value: object) -> dict[str, object]:
    table, _, key = path.rpartition(".")
    return {table: {key: value}} if table else {key: value}


BOTH = [s for s in SETTINGS if s.field and s.flags and s.toml]


@pytest.mark.parametrize("setting", BOTH, ids=[s.flags[-1] for s in BOTH])
def test_a_flag_and_its_toml_key_give_the_same_config(setting: Setting) -> None:
    assert setting.toml is not None
    arguments, value = example(setting)
    args = cli.build_parser().parse_args([setting.flags[-1], *arguments])
    from_command_line = merge(Config(), from_flags(args))
    from_toml = from_mapping(toml_document(setting.toml, value), source=Config().source)
    assert from_command_line != Config(), "the example must change something"
    assert from_command_line == from_toml
    assert from_flags(args).keys() == {setting.field}


def test_listen_flags_add_up_in_order_and_equal_toml() -> None:
    args = cli.build_parser().parse_args(["-6", "[::1]:2525", "-p", "127.0.0.1:25", "-p", ":26"])
    assert from_flags(args)["listen"] == (
        Listen("127.0.0.1", 25),
        Listen("0.0.0.0", 26),
        Listen("::1", 2525),  # -6 after -p, as before
    )
    toml = from_mapping({"listen": ["127.0.0.1:25", ":26", "[::1]:2525"]}, source="t")
    assert toml.listen == from_flags(args)["listen"]


def test_tls_in_front_without_a_list_is_toml_true() -> None:
    args = cli.build_parser().parse_args(["--tls-in-front"])
    assert (
        from_flags(args)["tls_in_front"]
        == from_mapping({"tls_in_front": True}, source="t").tls_in_front
    )
    assert from_flags(args)["tls_in_front"] == ("127.0.0.0/8", "::1/128")


def test_a_ratelimit_table_gives_the_store_and_the_limiter_options() -> None:
    table = {"store": "memory", "max_failures": 3, "base_backoff": 30}
    config = from_mapping({"ratelimit": table}, source="t")
    assert config.ratelimit == "memory"
    assert config.ratelimit_options == (("base_backoff", 30), ("max_failures", 3))
    assert from_mapping({"ratelimit": "off"}, source="t").ratelimit == "off"


def test_flags_not_given_leave_the_file_alone() -> None:
    args = cli.build_parser().parse_args([])
    assert from_flags(args) == {}
    base = from_mapping({"reverse_dns": False, "connections": 3}, source="t")
    assert merge(base, from_flags(args)) == base


@pytest.mark.parametrize(
    ("document", "words"),
    [
        ({"connections": "many"}, ["t: connections must be int"]),
        ({"delivery": {"timeout": "soon"}}, ["t [delivery]: timeout must be int or float"]),
        ({"tls": {"mod": "on"}}, ["t [tls]: unknown setting 'mod'"]),
        ({"log": {"stderr": True}}, ["t [log]: unknown setting 'stderr'"]),
        ({"ratelimit": 5}, ["t: ratelimit must be str or dict"]),
        ({"tls": "on"}, ["t: tls must be dict"]),
    ],
)
def test_toml_errors_name_the_key_and_table(document: dict[str, object], words: list[str]) -> None:
    with pytest.raises(ConfigError) as raised:
        from_mapping(document, source="t")
    for word in words:
        assert word in str(raised.value)


def test_toml_choices_are_checked_like_the_flags() -> None:
    config = from_mapping({"bare_newline": "strip", "auth": [{"kind": "pam"}]}, source="t")
    with pytest.raises(
        ConfigError, match="--bare-newline 'strip': must be one of normalize, reject"
    ):
        validate(config)


def test_help_keeps_its_groups_in_order() -> None:
    text = cli.build_parser().format_help()
    titles = ["general:", "connections:", "TLS:", "delivery:", "limits and abuse resistance:"]
    titles.append("authentication (tried in the order given):")
    positions = [text.index(title) for title in titles]
    assert positions == sorted(positions)
    for setting in SETTINGS:
        for flag in setting.flags:
            assert flag in text
