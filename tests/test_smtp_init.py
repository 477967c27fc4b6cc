"""ofmipd builds its aiosmtpd protocol state itself (no per-connection class scan);
this guards that shortcut against drift from aiosmtpd's own SMTP.__init__."""

from __future__ import annotations

import asyncio
import re
import types

import pytest
from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from ofmipd import smtp
from ofmipd.assemble import build_app
from ofmipd.cli import build_parser, config_from_args
from ofmipd.identity import ClientIdentity
from ofmipd.smtp import SubmissionServer


def test_fast_init_sets_what_aiosmtpd_sets(tmp_path):
    users = tmp_path / "users"
    users.write_text("u:p\n")
    users.chmod(0o600)
    args = build_parser().parse_args(["-a", str(users), "--maildir", str(tmp_path / "md")])
    app = build_app(config_from_args(args))

    async def both() -> tuple[SubmissionServer, SMTP]:
        ours = SubmissionServer(app, ClientIdentity(ip=""))
        reference = SMTP.__new__(SubmissionServer)
        SMTP.__init__(
            reference,
            app.handler,
            hostname=app.hostname,
            ident="ESMTP ofmipd",
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


@pytest.mark.slow
@settings(max_examples=1500, deadline=None)
@given(
    arg=st.one_of(
        st.lists(_PATH_CHARS, max_size=12).map("".join),
        st.builds(
            lambda pre, local, domain, post: f"{pre}<{local}@{domain}>{post}",
            st.sampled_from(["", " ", "\t ", "(c) "]),
            st.lists(_PATH_CHARS, min_size=1, max_size=6).map("".join),
            st.lists(_PATH_CHARS, min_size=1, max_size=6).map("".join),
            st.sampled_from(["", " ", "  SIZE=10", "x", " (c) BODY=8BITMIME", "\t(", " SIZE=1 "]),
        ),
    )
)
def test_address_parsing_matches_aiosmtpd(arg):
    server = types.SimpleNamespace(local_part_limit=0)  # all either method reads of self
    try:
        expected = SMTP._getaddr(server, arg)  # type: ignore[arg-type]
    except (IndexError, AttributeError):  # aiosmtpd crashes on '"' or '<a@[>': "malformed"
        expected = (None, None)
    if expected[0] is not None and not expected[0].isprintable():
        expected = (None, None)  # ofmipd also refuses a path with a control character in it
    assert SubmissionServer._getaddr(server, arg) == expected  # type: ignore[arg-type]


def test_address_fast_path_is_taken_for_ordinary_paths():
    assert re.match(smtp._SIMPLE_PATH, "<gina.b+tag@mail.example.org> SIZE=4096")
    assert not re.match(smtp._SIMPLE_PATH, '<"odd name"@example.org>')
