"""ofmipd.relay's pure parts: xtext, the XCLIENT lines, dot-stuffing, the URL."""

from __future__ import annotations

import pytest

from ofmipd.errors import ConfigError
from ofmipd.identity import ClientIdentity
from ofmipd.relay import Downstream, Identity, parse_url, stuffed, xtext


def test_xtext_encodes_plus_equals_space_and_non_ascii() -> None:
    assert xtext("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext("jörg") == "j+C3+B6rg"
    assert xtext("[UNAVAILABLE]") == "[UNAVAILABLE]"


def test_xclient_sends_only_offered_names_in_lines_under_512() -> None:
    identity = Identity(
        ClientIdentity("192.0.2.7", 4711, "h" * 250), "e" * 250, "u" * 250, esmtp=True
    )
    lines = identity.xclient("NAME ADDR PROTO HELO PORT LOGIN")
    assert len(lines) > 1
    assert all(len(line) + 2 <= 512 and line.startswith("XCLIENT ") for line in lines)
    sent = " ".join(line[8:] for line in lines)
    for item in ("ADDR=192.0.2.7", "PORT=4711", "PROTO=ESMTP", "LOGIN=" + "u" * 250):
        assert item in sent.split()
    assert Identity(ClientIdentity("192.0.2.7"), None, None, True).xclient("ADDR") == [
        "XCLIENT ADDR=192.0.2.7"
    ]


def test_xclient_login_is_xtext() -> None:
    [line] = Identity(ClientIdentity("::1"), "h", "a b+c", True).xclient("LOGIN")
    assert line == "XCLIENT LOGIN=a+20b+2Bc"


def test_stuffed_doubles_leading_dots_and_ends_the_message() -> None:
    assert stuffed(b".x\r\nb\r\n.\r\n") == b"..x\r\nb\r\n..\r\n.\r\n"
    assert stuffed(b"no newline") == b"no newline\r\n.\r\n"


def test_parse_url() -> None:
    assert parse_url("smtp://mx.example") == Downstream("mx.example", 25, False)
    assert parse_url("smtps://127.0.0.1:4650") == Downstream("127.0.0.1", 4650, True)
    assert parse_url("smtps://[::1]") == Downstream("::1", 465, True)
    for bad in ("http://x", "smtp://u:p@x", "smtp://x/path", "smtp://"):
        with pytest.raises(ConfigError):
            parse_url(bad)
