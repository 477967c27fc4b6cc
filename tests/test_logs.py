"""ofmipd/logs.py: AUTH payloads are blanked in any record, str or bytes."""

from __future__ import annotations

import logging

import pytest

from ofmipd.logs import RedactAuth, redact

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
