"""ofmipd/logs.py: AUTH payloads are blanked in any record, str or bytes."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from ofmipd.logs import RedactAuth, client_line, printable, redact, redact_url, setup

PAYLOAD = "AGdpbmEAc2VjcmV0"


@pytest.mark.parametrize(
    "line",
    [
        f"AUTH PLAIN {PAYLOAD}",
        f"auth plain {PAYLOAD}",
        f"  AUTH LOGIN {PAYLOAD}\r\n",
        f"AUTH PLAIN\t{PAYLOAD} trailing",
        f"AUTH PLAIN\xa0{PAYLOAD}",  # a non-ASCII space still separates the payload
    ],
)
def test_auth_payload_is_redacted_in_text_and_bytes(line):
    assert PAYLOAD not in redact(line)
    assert redact(line).endswith("<redacted>")
    raw = line.encode("utf-8", "surrogateescape")
    if line.isascii():
        assert PAYLOAD.encode() not in redact(raw)


@pytest.mark.parametrize("line", ["AUTH PLAIN", "MAIL FROM:<a@b>", "session 1: end user=gina", 42])
def test_other_values_pass_unchanged(line):
    assert redact(line) == line


def test_filter_rewrites_record_args_and_message():
    record = logging.LogRecord(
        "mail.log",
        logging.INFO,
        __file__,
        1,
        "%r >> %r",
        ("peer", f"AUTH PLAIN {PAYLOAD}".encode()),
        None,
    )
    assert RedactAuth().filter(record)
    assert PAYLOAD not in record.getMessage()
    bare = logging.LogRecord(
        "mail.log", logging.INFO, __file__, 1, f"AUTH PLAIN {PAYLOAD}", None, None
    )
    RedactAuth().filter(bare)
    assert PAYLOAD not in bare.getMessage()


@pytest.mark.parametrize(
    "value",
    [
        "alice\nauth reject: client=203.0.113.9 user=x",
        "alice\rauth reject: client=203.0.113.9",
        "alice\x85auth reject",  # NEL
        "alice\u2028auth reject",  # LINE SEPARATOR
        "alice\u2029x",
        "a\x00b\x1bc\x7fd",
        "rtl\u202eoverride",
        b"bytes\xff\nnot utf-8",
    ],
)
def test_printable_makes_one_line_of_any_client_value(value):
    text = printable(value)
    assert text.isprintable()
    assert len(text.splitlines()) == 1


def test_printable_escapes_are_unambiguous():
    assert printable("a\nb") == "a\\x0ab"
    assert printable("a\\x0ab") == "a\\x5cx0ab"  # a typed backslash cannot fake an escape
    assert printable("\u2028") == "\\u2028"
    assert printable(b"\xff") == "\\xff"
    assert printable("plain text, spaces kept") == "plain text, spaces kept"
    assert printable("x" * 300).endswith("...") and len(printable("x" * 300)) == 259


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("redis://:S3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        (
            "-R imaps://alice:S3cret@mail.example.org: bad port",
            "-R imaps://alice:***@mail.example.org: bad port",
        ),
        ("rediss://u:p%40ss@h/1 and redis://:x@y", "rediss://u:***@h/1 and redis://:***@y"),
        ("ldap://host/uid=%s,dc=example", "ldap://host/uid=%s,dc=example"),
        ("imap://alice@host", "imap://alice@host"),
        # An "@" in the password: hidden up to the last one, as urlsplit reads it.
        ("redis://:p@ss@h:6379/0 ok", "redis://:***@h:6379/0 ok"),
        ("'imaps://u:a@b@[::1]:993': Invalid", "'imaps://u:***@[::1]:993': Invalid"),
        # A password typed without "@host" reads as a port that is no number.
        ("-R imaps://alice:S3cret: bad port", "-R imaps://alice:***: bad port"),
        ("redis://:S3cret", "redis://:***"),
        (
            "ldap://[::1]:389 ldap://[::1 ldap://h:636/x",
            "ldap://[::1]:389 ldap://[::1 ldap://h:636/x",
        ),
        ("imaps://[::1]:x", "imaps://[::1]:***"),
    ],
)
def test_redact_url_hides_passwords_in_urls(text, shown):
    assert redact_url(text) == shown


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        (f"AUTH PLAIN={PAYLOAD}", "AUTH PLAIN <redacted>"),
        (f"XAUTH PLAIN {PAYLOAD}", "XAUTH PLAIN <redacted>"),
        (f"auth\tplain {PAYLOAD}", "auth\tplain <redacted>"),
        (f"   auth plain {PAYLOAD}", "   auth plain <redacted>"),
        (f"AUTH={PAYLOAD}", "AUTH <redacted>"),
        (f"Auth Login {PAYLOAD}\r\n", "Auth Login <redacted>"),
        # words that merely contain "auth" are not AUTH commands
        ("authfile /etc/ofmipd/users has mode 0644", "authfile /etc/ofmipd/users has mode 0644"),
        ("author of x", "author of x"),
    ],
)
def test_redact_blanks_every_auth_looking_payload_and_nothing_else(line, shown):
    assert redact(line) == shown
    assert redact(line.encode()) == shown.encode()


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        (b"EHLO client.test\r\n", "EHLO client.test"),
        (b"AUTH LOGIN\r\n", "AUTH LOGIN"),
        (f"AUTH PLAIN {PAYLOAD}\r\n".encode(), "AUTH PLAIN <redacted>"),
        (f"{PAYLOAD}\r\n".encode(), "<16 characters, not a command: not shown>"),
        (b"GET / HTTP/1.1\r\n", "<14 characters, not a command: not shown>"),
        (b"MAIL FROM:<a\rb@example.org>\r\n", "MAIL FROM:<a\\x0db@example.org>"),
    ],
)
def test_client_line_shows_commands_and_hides_what_may_be_a_password(line, shown):
    assert client_line(line) == shown


def logged_lines(log) -> list[str]:
    """What ofmipd's real stderr set-up writes for the calls `log` makes."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, sys.stderr)
    buffer = io.StringIO()
    sys.stderr = buffer
    try:
        setup(debug=True, syslog=False)
        log()
    finally:
        sys.stderr = saved[2]
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
    return buffer.getvalue().splitlines()


def test_a_call_site_that_forgot_printable_still_writes_one_line():
    forged = "x\nauth reject: client=203.0.113.9 user=y\r\x85\u2028z"

    def log() -> None:
        logging.getLogger("ofmipd.test").warning("user %s", forged)
        logging.getLogger("ofmipd.test").info("100%% plain, %s", "args too")
        try:
            raise ValueError("boom")
        except ValueError:  # a traceback is legitimately several lines
            logging.getLogger("ofmipd.test").error("failed", exc_info=True)

    lines = logged_lines(log)
    assert lines[0].isprintable()
    assert lines[0].endswith("user x\\x0aauth reject: client=203.0.113.9 user=y\\x0d\\x85\\u2028z")
    assert lines[1].endswith("INFO 100% plain, args too")
    assert lines[2].endswith("ERROR failed") and lines[3] == "Traceback (most recent call last):"


def test_aiosmtpd_trace_shows_no_unrecognised_command_text():
    def log() -> None:
        trace = logging.getLogger("mail.log")
        peer = ("192.0.2.1", 1234)
        trace.debug("_handle_client readline: %r", f"{PAYLOAD}\r\n".encode())
        trace.info("%r >> %r", peer, f"{PAYLOAD}".encode())
        trace.warning("%r unrecognised: %s", peer, PAYLOAD.upper())
        trace.warning("%r over limit for %s", peer, "NOOP")

    lines = logged_lines(log)
    assert not any(PAYLOAD in line or PAYLOAD.upper() in line for line in lines), lines
    assert [line.split(": ", 1)[1] for line in lines] == [
        "INFO ('192.0.2.1', 1234) >> <16 characters, not a command: not shown>",
        "WARNING ('192.0.2.1', 1234) unrecognised: <16 characters>",
        "WARNING ('192.0.2.1', 1234) over limit for NOOP",
    ]
