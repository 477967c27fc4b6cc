"""ofmipd/logs.py: AUTH payloads are blanked in any record, str or bytes."""

from __future__ import annotations

import logging

import pytest

from ofmipd.logs import RedactAuth, printable, redact, redact_url

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
