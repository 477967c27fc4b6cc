"""ofmipd builds its aiosmtpd protocol state itself (no per-connection class scan);
this guards that shortcut against drift from aiosmtpd's own SMTP.__init__."""

from __future__ import annotations

import asyncio
import functools
import re
import types
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from ofmipd import smtp
from ofmipd.assemble import build_app
from ofmipd.cli import build_parser, config_from_args
from ofmipd.identity import ClientIdentity
from ofmipd.smtp import SubmissionProtocol


def test_fast_init_sets_what_aiosmtpd_sets(tmp_path):
    users = tmp_path / "users"
    users.write_text("u:p\n")
    users.chmod(0o600)
    args = build_parser().parse_args(["-a", str(users), "--maildir", str(tmp_path / "md")])
    app = build_app(config_from_args(args))

    async def both() -> tuple[SubmissionProtocol, SMTP]:
        ours = SubmissionProtocol(app, ClientIdentity(ip=""))
        reference = SMTP.__new__(SubmissionProtocol)
        SMTP.__init__(
            reference,
            smtp.handler_for(app),
            hostname=app.hostname,
            ident="ESMTP ofmipd",
            enable_SMTPUTF8=True,  # ofmipd advertises SMTPUTF8
            data_size_limit=app.config.size_limit,
            timeout=app.config.idle_timeout,
            auth_require_tls=False,
            command_call_limit={"*": app.config.max_commands},
            loop=asyncio.get_running_loop(),
        )
        return ours, reference

    ours, reference = asyncio.run(both())
    missing = set(vars(reference)) - set(vars(ours))
    assert missing == set(), f"aiosmtpd sets {missing} that ofmipd's fast init does not"
    assert set(ours._smtp_methods) == set(reference._smtp_methods)
    assert set(ours._handle_hooks) == set(reference._handle_hooks)
    for name in (
        "hostname",
        "data_size_limit",
        "_timeout_duration",
        "_auth_require_tls",
        "_enforce_call_limit",
        "_call_limit_default",
        "_proxy_timeout",
        "enable_SMTPUTF8",
        "_decode_data",
        "__ident__",
    ):
        assert getattr(ours, name) == getattr(reference, name), name
    assert not ours.require_starttls and not reference.require_starttls


# ---- MAIL FROM / RCPT TO paths: ofmipd's fast path must agree with aiosmtpd's parser ----

_PATH_CHARS = st.sampled_from(list('ab.Z9-_+=@<>[]"() \t:,;\\!#~') + ["xn--d", "a@b.c"])


def _unterminated_quote(arg: str) -> bool:
    """The parser's own word for a path that ends inside a quoted string."""
    parse = get_angle_addr if arg.lstrip().startswith("<") else get_addr_spec
    try:
        address, _ = parse(arg)
    except (HeaderParseError, IndexError, AttributeError):  # malformed: not this question
        return False
    return any("inside quoted string" in str(d) for d in address.all_defects)


@pytest.mark.slow
@settings(max_examples=1500, deadline=None)
@given(
    arg=st.one_of(
        st.lists(_PATH_CHARS, max_size=12).map("".join),
        st.builds(
            lambda pre, local, domain, post: f"{pre}<{local}@{domain}>{post}",
            st.sampled_from(["", " ", "\t ", "(c) "]),
            st.one_of(
                st.lists(_PATH_CHARS, min_size=1, max_size=6).map("".join),
                # around the local part's limit, plain and quoted
                st.integers(60, 68).map("l".__mul__),
                st.integers(58, 66).map(lambda n: f'"{"q " * (n // 2)}"'),
            ),
            st.lists(_PATH_CHARS, min_size=1, max_size=6).map("".join),
            st.sampled_from(["", " ", "  SIZE=10", "x", " (c) BODY=8BITMIME", "\t(", " SIZE=1 "]),
        ),
    )
)
def test_address_parsing_matches_aiosmtpd(arg):
    # The same local-part limit on both sides: aiosmtpd's default of 0 turns its check off.
    server = types.SimpleNamespace(local_part_limit=SubmissionProtocol.local_part_limit)
    try:
        expected = SMTP._getaddr(server, arg)  # type: ignore[arg-type]
    except (IndexError, AttributeError):  # aiosmtpd crashes on '"' or '<a@[>': "malformed"
        expected = (None, None)
    if expected[0] is not None and not expected[0].isprintable():
        expected = (None, None)  # ofmipd also refuses a path with a control character in it
    if expected[0] is not None and _unterminated_quote(arg):
        expected = (None, None)  # and one that ends inside a quoted string: <"x>
    assert SubmissionProtocol._getaddr(server, arg) == expected  # type: ignore[arg-type]


def test_local_part_limit_is_rfc_5321s():
    server = types.SimpleNamespace(local_part_limit=SubmissionProtocol.local_part_limit)
    parse = functools.partial(SubmissionProtocol._getaddr, server)  # type: ignore[arg-type]
    assert parse(f"<{'a' * 64}@example.org>")[0] == f"{'a' * 64}@example.org"
    assert parse(f"<{'a' * 65}@example.org>") == (None, None)  # the fast path
    assert parse(f"<{'a' * 65}@example.org> (c)") == (None, None)  # the email parser
    assert parse(f'<"{"a " * 32}"@example.org>') == (None, None)  # 66 with its quotes
    assert parse(f'<"{"a " * 31}"@example.org>')[0] == f'"{"a " * 31}"@example.org'


@pytest.mark.parametrize("arg", ['<"x>', '"x', '<"x@example.org>', '<"x> SIZE=10'])
def test_a_path_ending_inside_a_quoted_string_is_malformed(arg):
    server = types.SimpleNamespace(local_part_limit=SubmissionProtocol.local_part_limit)
    assert SubmissionProtocol._getaddr(server, arg) == (None, None)  # type: ignore[arg-type]


def test_address_fast_path_is_taken_for_ordinary_paths():
    assert re.match(smtp._SIMPLE_PATH, "<gina.b+tag@mail.example.org> SIZE=4096")
    assert not re.match(smtp._SIMPLE_PATH, '<"odd name"@example.org>')
