"""Host rules: file syntax, errors with line numbers, first-match lookup for ofmipd's
syntax, tcpserver's most-specific lookup for tcprules lines, TOML tables."""

from __future__ import annotations

import ipaddress
import random
import tomllib
from pathlib import Path

import pytest

from ofmipd.errors import ConfigError
from ofmipd.rules import (
    ALLOW,
    DEFAULT_RULE,
    DENY,
    FIRST_MATCH,
    MOST_SPECIFIC,
    RELAY,
    REQUIRE_TLS,
    Rules,
)

EXAMPLE = """\
# who                  action
127.0.0.1              relay
10.0.0.0/8             require-tls   # branch offices
2001:db8::/32          allow
192.0.2.66             deny   "Your host is blocked"
192.0.2.0/24           relay
   # indented comment
::1                    relay

*                      allow
"""


def test_example_file_first_match_wins() -> None:
    rules = Rules.from_text(EXAMPLE, "rules.txt")
    assert len(rules) == 7
    assert rules.match("127.0.0.1").action == RELAY
    assert rules.match("10.1.2.3").action == REQUIRE_TLS
    assert rules.match("2001:db8:1::5").action == ALLOW
    denied = rules.match("192.0.2.66")
    assert (denied.action, denied.message) == (DENY, "Your host is blocked")
    assert rules.match("192.0.2.67").action == RELAY  # the /24 after the single deny
    assert rules.match("::1").action == RELAY
    assert rules.match("198.51.100.1").matcher == "*"


def test_rule_describes_where_it_came_from() -> None:
    rules = Rules.from_text(EXAMPLE, "/etc/ofmipd/rules")
    assert rules.match("10.9.9.9").describe() == (
        "rule at /etc/ofmipd/rules:3 (10.0.0.0/8 require-tls)"
    )
    assert rules.match("192.0.2.66").where == "/etc/ofmipd/rules:5"


def test_ipv4_mapped_client_matches_ipv4_rule() -> None:
    rules = Rules.from_text(EXAMPLE, "r")
    assert rules.match("::ffff:10.1.2.3").action == REQUIRE_TLS
    assert rules.match("::ffff:192.0.2.66").action == DENY


@pytest.mark.parametrize(
    ("ip", "action"),
    [
        ("::ffff:a01:203", REQUIRE_TLS),  # mapped, in hex
        ("[::1]", RELAY),
        (" 127.0.0.1 ", RELAY),
        ("2001:db8::1%eth0", ALLOW),
        ("010.0.0.1", ALLOW),  # not an address: only * matches
        ("10.0.0.1\x00", ALLOW),
    ],
)
def test_client_address_spellings(ip: str, action: str) -> None:
    rules = Rules.from_text(EXAMPLE, "r")
    got = rules.match(ip)
    assert got.action == action, got
    if ip.startswith("010") or ip.endswith("\x00"):
        assert got.matcher == "*"


def test_ipv4_mapped_rule_matches_ipv4_client() -> None:
    rules = Rules.from_text("::ffff:10.0.0.0/104 deny\n::ffff:192.0.2.1 relay\n", "r")
    assert rules.match("10.3.3.3").action == DENY
    assert rules.match("192.0.2.1").action == RELAY


def test_no_match_gives_default_allow() -> None:
    rules = Rules.from_text("10.0.0.0/8 deny\n", "r")
    assert rules.match("192.0.2.1") is DEFAULT_RULE
    assert DEFAULT_RULE.action == ALLOW
    assert DEFAULT_RULE.describe() == "default rule (allow)"
    assert Rules.from_text("", "empty").match("10.0.0.1") is DEFAULT_RULE


def test_unknown_client_address_matches_only_wildcard() -> None:
    rules = Rules.from_text("0.0.0.0/0 relay\n::/0 relay\n* deny\n", "r")
    assert rules.match("").action == DENY
    assert rules.match("garbage").action == DENY
    assert Rules.from_text("0.0.0.0/0 relay\n", "r").match("") is DEFAULT_RULE


def test_wildcard_shadows_later_rules() -> None:
    rules = Rules.from_text("10.0.0.1 relay\n* deny\n10.0.0.2 relay\n", "r")
    assert rules.match("10.0.0.1").action == RELAY
    assert rules.match("10.0.0.2").action == DENY


def test_earlier_duplicate_network_wins() -> None:
    rules = Rules.from_text("10.0.0.0/8 deny\n10.0.0.0/8 relay\n", "r")
    assert rules.match("10.0.0.1").where == "r:1"


def test_action_is_case_insensitive() -> None:
    assert Rules.from_text("10.0.0.0/8 Require-TLS\n", "r").match("10.0.0.1").action == REQUIRE_TLS


def test_tcprules_subset() -> None:
    text = (
        '127.0.0.1:allow,RELAYCLIENT=""\n10.:deny\n192.168.:allow\n'
        '::1:allow,RELAYCLIENT=""\n:deny\n'
    )
    rules = Rules.from_text(text, "tcp.smtp")
    assert rules.match("127.0.0.1").action == RELAY
    assert rules.match("10.200.1.1").action == DENY
    assert rules.match("192.168.7.7").action == ALLOW
    assert rules.match("::1").action == RELAY
    assert rules.match("198.51.100.1").action == DENY
    assert rules.match("10.0.0.1").describe() == "rule at tcp.smtp:2 (10. deny)"


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("10.0.0.0/8", "expected WHO ACTION"),
        ("10.0.0.0/8 permit", "unknown action 'permit'"),
        ("10.0.0.1/8 allow", "did you mean 10.0.0.0/8"),
        ("10.0.0.0/33 allow", "not an address"),
        ("mail.example.org allow", "not an address"),
        ("10.0.0.0/8 allow extra", "expected WHO ACTION"),
        ('10.0.0.0/8 relay "hello"', "only allowed with deny"),
        ('10.0.0.0/8 deny "bad\tmessage"', "printable ASCII"),
        ('10.0.0.0/8 deny ""', "printable ASCII"),
        ("10.0.0.0/8 deny unquoted message", "expected WHO ACTION"),
        ("1.2.3.4 :allow", "unknown action ':allow'"),
    ],
)
def test_malformed_line_names_file_and_line(line: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as error:
        Rules.from_text(f"# header\n127.0.0.1 relay\n{line}\n* allow\n", "/etc/ofmipd/rules")
    message = str(error.value)
    assert message.startswith("/etc/ofmipd/rules line 3: "), message
    assert fragment in message
    assert "\n" not in message


# ---- tcprules lines: looked up as tcpserver does ---------------------------------------


def test_tcprules_exact_address_beats_default_above_it() -> None:
    rules = Rules.from_text(":allow\n127.0.0.11:deny\n", "tcp.smtp")
    assert rules.match("127.0.0.11").action == DENY
    assert rules.match("::ffff:127.0.0.11").action == DENY
    assert rules.match("127.0.0.12").action == ALLOW
    assert rules.order == MOST_SPECIFIC


def test_tcprules_host_line_beats_broad_relayclient_above_it() -> None:
    rules = Rules.from_text('127.:allow,RELAYCLIENT=""\n127.0.0.5:allow\n', "tcp.smtp")
    assert rules.match("127.0.0.5").action == ALLOW  # not an open relay
    assert rules.match("127.0.0.6").action == RELAY


def test_tcprules_longest_prefix_wins_whatever_the_order() -> None:
    lines = [":deny", "10.:allow", "10.1.:deny", "10.1.2.:allow", "10.1.2.3:deny"]
    probes = {"10.1.2.3": DENY, "10.1.2.4": ALLOW, "10.1.3.1": DENY, "10.2.0.1": ALLOW}
    rng = random.Random(5)
    for _ in range(20):
        rng.shuffle(lines)
        rules = Rules.from_text("\n".join(lines), "tcp.smtp")
        assert {ip: rules.match(ip).action for ip in probes} == probes, lines
    assert rules.match("192.0.2.1").action == DENY
    assert rules.match("").action == DENY  # an unknown client gets the default line
    assert rules.match("2001:db8::1").action == DENY


def test_tcprules_same_address_twice_first_line_counts() -> None:
    text = "10.1.:deny\n:allow\n10.1.:allow\n:deny\n1.2.3.4-6:deny\n1.2.3.5:allow\n"
    rules = Rules.from_text(text, "tcp.smtp")
    assert rules.match("10.1.0.1").where == "tcp.smtp:1"
    assert rules.match("192.0.2.1").where == "tcp.smtp:2"
    assert rules.match("1.2.3.5").where == "tcp.smtp:5"  # the range came first


def test_tcprules_ranges_are_expanded_as_tcprules_does() -> None:
    text = "1.2.3.4-7:deny\n10.2-3.:deny\n1.2.4.250-300:deny\n1.2.5.07-08:deny\n:allow\n"
    rules = Rules.from_text(text, "tcp.smtp")
    denied = ["1.2.3.4", "1.2.3.7", "10.2.0.1", "10.3.9.9", "1.2.4.255", "1.2.5.7", "1.2.5.8"]
    allowed = ["1.2.3.3", "1.2.3.8", "10.4.0.1", "1.2.4.249", "1.2.5.9"]
    assert [ip for ip in denied if rules.match(ip).action != DENY] == []
    assert [ip for ip in allowed if rules.match(ip).action != ALLOW] == []
    assert rules.match("1.2.3.5").describe() == "rule at tcp.smtp:1 (1.2.3.4-7 deny)"
    assert len(rules) == 5  # a range is one rule


@pytest.mark.parametrize(
    "instructions",
    ['allow,RELAYCLIENT=""', 'allow,RELAYCLIENT="@fix.me"', "allow,RELAYCLIENT=/x/",
     'allow,RELAYCLIENT="",RELAYCLIENT="a b"'],
)  # fmt: skip
def test_tcprules_relayclient_with_any_value_means_relay(instructions: str) -> None:
    rules = Rules.from_text(f"10.:{instructions}  \n", "tcp.smtp")
    assert rules.match("10.9.9.9").action == RELAY


def test_tcprules_deny_with_variables_is_deny() -> None:
    rules = Rules.from_text('10.:deny,RELAYCLIENT=""\n11.:deny,RBLSMTPD="x"\n', "tcp.smtp")
    assert rules.match("10.0.0.1").action == DENY
    assert rules.match("11.0.0.1").action == DENY


def test_tcprules_comments_blank_lines_and_crlf() -> None:
    rules = Rules.from_text("# 10.:deny\r\n\r\n10.:allow\r\n#:deny\n", "tcp.smtp")
    assert rules.match("10.0.0.1").where == "tcp.smtp:3"
    assert rules.match("11.0.0.1") is DEFAULT_RULE


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("=mail.example.org:allow", "DNS"),
        ("=:deny", "DNS"),
        ("joe@127.0.0.1:allow", "TCPREMOTEINFO"),
        ('10.:allow,RBLSMTPD=""', "'RBLSMTPD'"),
        ('10.:allow,RELAYCLIENT="",TCPLOCALHOST="x"', "'TCPLOCALHOST'"),
        ('10.:allow,RELAYCLIENT="x', "no closing"),
        ("10.:allow,RELAYCLIENT", "NAME="),
        ("10.:allow # trusted", "NAME="),
        ("10.:allowed", "NAME="),
        (" 10.:deny", "first column"),
        ("1.2.3.4.:allow", "never match"),
        ("1.2.3:allow", "never match"),
        ("300.:allow", "0 to 255"),
        ("1.2.3.04:allow", "leading"),
        ("010.:allow", "leading"),
        ("1.2.3.7-4:allow", "empty"),
        ("1.2.3.256-300:allow", "empty"),
        ("1.2.3.-4:allow", "bad range"),
        ("1.2.3.1-2-3:allow", "bad range"),
        ("1.2.3.1-1000:allow", "bad range"),
        ("1.2-3.4-5.:allow", "never match"),
        ("::ffff:10.0.0.1:allow", "as 10.0.0.1"),
        ("2001:db8::/32:allow", "IPv6"),
        ("\u0661.:allow", "0 to 255"),
        ("1." * 50_000 + ":deny", "too long"),
    ],
)
def test_tcprules_line_that_cannot_be_honoured_names_file_and_line(
    line: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as error:
        Rules.from_text(f"# header\n127.0.0.1:allow\n{line}\n:allow\n", "/etc/tcp.smtp")
    message = str(error.value)
    assert message.startswith("/etc/tcp.smtp line 3: "), message
    assert fragment in message, message
    assert "\n" not in message and len(message) < 300


@pytest.mark.parametrize(
    ("text", "line", "first"),
    [
        ("# ofmipd first\n10.0.0.0/8 deny\n\n:allow\n", 4, 2),
        (":allow\n127.0.0.11:deny\n* deny\n", 3, 1),
        ("127.0.0.1:allow\n10.0.0.0/8 relay\n", 2, 1),
    ],
)
def test_file_mixing_the_two_syntaxes_is_refused(text: str, line: int, first: int) -> None:
    with pytest.raises(ConfigError) as error:
        Rules.from_text(text, "rules")
    message = str(error.value)
    assert message.startswith(f"rules line {line}: "), message
    assert f"line {first} is in" in message and "one syntax per file" in message


def test_ofmipd_syntax_keeps_first_match_order() -> None:
    rules = Rules.from_text("* allow\n127.0.0.11 deny\n", "rules")
    assert rules.match("127.0.0.11").action == ALLOW
    assert rules.order == FIRST_MATCH


def test_from_file_reads_and_reports_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "rules"
    path.write_text(EXAMPLE)
    rules = Rules.from_file(path)
    assert rules.match("10.0.0.1").where == f"{path}:3"
    with pytest.raises(ConfigError, match="rules file .*missing"):
        Rules.from_file(tmp_path / "missing")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe 10.0.0.0/8 allow\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        Rules.from_file(binary)


def test_from_config_toml_tables() -> None:
    data = tomllib.loads(
        """
        [[rule]]
        match = "10.0.0.0/8"
        action = "require-tls"

        [[rule]]
        match = ["192.0.2.66", "2001:db8::66"]
        action = "deny"
        message = "Go away"

        [[rule]]
        match = "*"
        action = "relay"
        """
    )
    rules = Rules.from_config(data["rule"], "ofmipd.toml")
    assert rules.match("10.1.1.1").describe() == (
        "rule at ofmipd.toml [[rule]] #1 (10.0.0.0/8 require-tls)"
    )
    assert rules.match("2001:db8::66").message == "Go away"
    assert rules.match("192.0.2.66").where == "ofmipd.toml [[rule]] #2"
    assert rules.match("198.51.100.1").action == RELAY


@pytest.mark.parametrize(
    ("table", "fragment"),
    [
        ({"action": "allow"}, '"match"'),
        ({"match": "10.0.0.0/8"}, '"action"'),
        ({"match": "10.0.0.0/8", "action": "nope"}, "unknown action"),
        ({"match": "10.0.0.0/8", "action": "allow", "when": "now"}, "unknown key 'when'"),
        ({"match": [], "action": "allow"}, '"match"'),
        ({"match": [10], "action": "allow"}, "strings"),
        ({"match": "10.0.0.1/8", "action": "allow"}, "host bits"),
        ({"match": "10.0.0.0/8", "action": "deny", "message": 5}, '"message"'),
    ],
)
def test_from_config_errors_name_the_table(table: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as error:
        Rules.from_config([{"match": "*", "action": "allow"}, table], "ofmipd.toml")
    assert str(error.value).startswith("ofmipd.toml [[rule]] #2: ")
    assert fragment in str(error.value)


# ---- the indexed lookup agrees with the obvious one ------------------------------------


def _random_rules(rng: random.Random, count: int) -> list[str]:
    lines = []
    for _ in range(count):
        if rng.random() < 0.7:
            length = rng.choice([8, 12, 16, 20, 24, 24, 24, 28, 30, 32, 32, 32])
            address = ipaddress.IPv4Address(rng.getrandbits(32))
            network = ipaddress.IPv4Network((address, length), strict=False)
        else:
            length = rng.choice([16, 32, 48, 56, 64, 64, 96, 112, 128])
            # a shared /16 so IPv6 rules overlap and nest
            address = ipaddress.IPv6Address((0x2001_0DB8 << 96) | rng.getrandbits(112))
            network = ipaddress.IPv6Network((address, length), strict=False)
        text = str(network.network_address) if length in (32, 128) else str(network)
        lines.append(f"{text} {rng.choice(['allow', 'deny', 'relay', 'require-tls'])}")
    return lines


class Naive:
    """The obvious first-match scan, on precomputed integers so the test stays quick."""

    def __init__(self, lines: list[str]) -> None:
        self.entries: list[tuple[int, int, int] | None] = []
        for line in lines:
            who = line.split()[0]
            if who == "*":
                self.entries.append(None)
                continue
            network = ipaddress.ip_network(who)
            mask = int(network.netmask)
            self.entries.append((network.version, int(network.network_address), mask))

    def match(self, ip: str) -> int | None:
        address = ipaddress.ip_address(ip)
        version, value = address.version, int(address)
        for index, entry in enumerate(self.entries):
            if entry is None or (entry[0] == version and value & entry[2] == entry[1]):
                return index
        return None


def _probe_addresses(rng: random.Random, lines: list[str], count: int) -> list[str]:
    probes = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.6:  # inside some rule's network, so matches are common
            network = ipaddress.ip_network(rng.choice(lines).split()[0])
            offset = rng.getrandbits(network.max_prefixlen - network.prefixlen or 1)
            offset %= network.num_addresses
            probes.append(str(network.network_address + offset))
        elif roll < 0.8:
            probes.append(str(ipaddress.IPv4Address(rng.getrandbits(32))))
        else:
            probes.append(str(ipaddress.IPv6Address((0x2001_0DB8 << 96) | rng.getrandbits(96))))
    return probes


@pytest.mark.slow
def test_ten_thousand_rules_agree_with_naive_first_match() -> None:
    rng = random.Random(20240611)
    lines = _random_rules(rng, 10_000)
    rules, naive = Rules.from_text("\n".join(lines), "big"), Naive(lines)
    for ip in _probe_addresses(rng, lines, 3000):
        expected = naive.match(ip)
        got = rules.match(ip)
        if expected is None:
            assert got is DEFAULT_RULE, ip
        else:
            assert got.where == f"big:{expected + 1}", ip


def test_wildcard_in_the_middle_agrees_with_naive_first_match() -> None:
    rng = random.Random(7)
    lines = _random_rules(rng, 2000)
    lines.insert(1000, "* deny")
    rules, naive = Rules.from_text("\n".join(lines), "big"), Naive(lines)
    for ip in _probe_addresses(rng, lines[:1000] + lines[1001:], 2000):
        expected = naive.match(ip)
        assert expected is not None
        assert rules.match(ip).where == f"big:{expected + 1}", ip
