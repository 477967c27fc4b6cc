"""RFC 6409 §8 fix-ups: Message-ID and Date added to an authenticated user's message
that lacks them, and only then; the header section alone decides."""

from __future__ import annotations

import re
import smtplib
import time
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from ofmipd.fixups import fix_up, header_end, header_fields
from tests.ofmipd_server import authfile, captured_messages, start_daemon

PASSWORD = "Fixups-Pass-5"
COMPLETE = (
    b"From: f@example.org\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <kept@example.org>\r\nSubject: s\r\n\r\nbody\r\n"
)


def fixed(content: bytes, **flags: bool) -> bytes:
    options = {"add_message_id": True, "add_date": True, **flags}
    return fix_up(content, hostname="mx.test", queue_id="Q1", now=0.0, **options)


def test_message_with_both_fields_is_returned_untouched() -> None:
    assert fixed(COMPLETE) is COMPLETE
    odd_case = b"DATE: x\r\nmessage-id: <a@b>\r\n\r\nbody\r\n"
    assert fixed(odd_case) is odd_case
    obsolete = b"Date : x\r\nMessage-Id\t: <a@b>\r\n\r\nbody\r\n"  # blanks before ':'
    assert fixed(obsolete) is obsolete


def test_missing_fields_go_at_the_end_of_the_header_section() -> None:
    out = fixed(b"From: f@example.org\r\nSubject: s\r\n\r\nDate: in the body\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert body == b"Date: in the body\r\n"
    lines = head.split(b"\r\n")
    assert lines[:2] == [b"From: f@example.org", b"Subject: s"]
    assert re.fullmatch(rb"Message-ID: <Q1\.[0-9a-f]{12}@mx\.test>", lines[2])
    assert lines[3].startswith(b"Date: ") and parsedate_to_datetime(lines[3][6:].decode())


def test_date_or_message_id_in_the_body_does_not_count() -> None:
    out = fixed(b"Subject: s\r\n\r\nDate: x\r\nMessage-ID: <x@y>\r\n")
    names = [name for name, _ in header_fields(out)]
    assert names == ["subject", "message-id", "date"]


def test_folded_header_is_one_field() -> None:
    message = b"Subject: a\r\n folded\r\n\tDate: not a field\r\nDate: x\r\n\r\nb\r\n"
    assert header_fields(message)[0] == ("subject", b" a folded\tDate: not a field")
    assert fixed(message, add_message_id=False) is message


def test_message_without_separator_gets_one() -> None:
    # The first line that is not a field starts the body (Postfix's reading).
    out = fixed(b"Subject: s\r\nhello world\r\n")
    assert out.startswith(b"Subject: s\r\nMessage-ID: <Q1.")
    assert out.endswith(b"\r\n\r\nhello world\r\n")
    only_body = fixed(b"hello\r\n", add_message_id=False)
    assert only_body.startswith(b"Date: ") and only_body.endswith(b"\r\n\r\nhello\r\n")
    only_header = fixed(b"Subject: s\r\n", add_date=False)
    assert only_header.startswith(b"Subject: s\r\nMessage-ID: ")
    assert only_header.endswith(b">\r\n\r\n")
    assert fixed(b"", add_date=False).endswith(b">\r\n\r\n")


def test_leading_continuation_line_is_body() -> None:
    assert header_end(b" x: y\r\n\r\n") == 0


def test_each_fix_up_can_be_off() -> None:
    message = b"Subject: s\r\n\r\nb\r\n"
    assert b"Message-ID" not in fixed(message, add_message_id=False)
    assert b"Date" not in fixed(message, add_date=False)
    assert fixed(message, add_message_id=False, add_date=False) is message


def test_two_messages_get_different_ids() -> None:
    first, second = fixed(b"\r\nb\r\n"), fixed(b"\r\nb\r\n")
    assert first.split(b"\r\n")[0] != second.split(b"\r\n")[0]


def send(server, message: bytes, login: bool = True) -> None:
    with smtplib.SMTP(server.host, server.port, timeout=20) as client:
        if login:
            client.login("frank", PASSWORD)
        client.sendmail("frank@example.org", ["to@example.net"], message)


@pytest.fixture
def users(tmp_path: Path) -> Path:
    return authfile(tmp_path, f"frank:{PASSWORD}\n")


def test_daemon_adds_message_id_and_date_for_a_login(
    tmp_path: Path, users: Path, capture: Path
) -> None:
    before = time.time()
    with start_daemon(tmp_path, users, capture) as server:
        send(server, b"Subject: bare\r\n\r\nhi\r\n")
        send(server, COMPLETE)
    (_, bare), (_, complete) = captured_messages(capture)
    assert re.search(rb"\r\nMessage-ID: <[0-9A-F]+\.[0-9a-f]{12}@mx\.test>\r\n", bare)
    date = re.search(rb"\r\nDate: ([^\r]+)\r\n", bare)
    assert date and parsedate_to_datetime(date.group(1).decode()).timestamp() >= int(before)
    assert bare.endswith(b"\r\n\r\nhi\r\n")
    assert complete.endswith(COMPLETE)  # after our Received header, byte for byte


def test_daemon_fix_ups_switched_off(tmp_path: Path, users: Path, capture: Path) -> None:
    with start_daemon(tmp_path, users, capture, "--no-add-message-id", "--no-add-date") as server:
        send(server, b"Subject: bare\r\n\r\nhi\r\n")
    ((_, message),) = captured_messages(capture)
    assert b"Message-ID" not in message and b"\r\nDate:" not in message


def test_message_at_the_size_limit_still_gets_its_fix_ups(
    tmp_path: Path, users: Path, capture: Path
) -> None:
    # SIZE counts what the client sends; the added fields must not turn it into a 552.
    message = b"Subject: s\r\n\r\n" + (b"x" * 98 + b"\r\n") * 40
    limit = len(message)
    with start_daemon(tmp_path, users, capture, "--size-limit", str(limit)) as server:
        send(server, message)
    ((_, delivered),) = captured_messages(capture)
    assert b"\r\nMessage-ID: " in delivered and delivered.endswith(message[14:])


def test_check_config_names_the_fix_ups(users: Path) -> None:
    import subprocess

    from tests.ofmipd_server import CAPTURE, ofmipd_command, server_env

    def describe(*args: str) -> str:
        done = subprocess.run(
            ofmipd_command("--check-config", "-a", str(users), "--sendmail", CAPTURE, *args),
            capture_output=True, text=True, env=server_env(), timeout=30,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "fix-ups for logins (RFC 6409): Message-ID, Date\n" in describe()
    assert "fix-ups for logins (RFC 6409): Date\n" in describe("--no-add-message-id")
    toml = users.parent / "ofmipd.toml"
    toml.write_text("add_message_id = false\nadd_date = false\n")
    assert "fix-ups for logins (RFC 6409): off\n" in describe("--config", str(toml))


def test_relay_client_without_login_gets_no_fix_ups(
    tmp_path: Path, users: Path, capture: Path
) -> None:
    # §8 is for the MSA's own users; a trusted relay host's message is its own business.
    rules = tmp_path / "rules"
    rules.write_text("127.0.0.1 relay\n")
    with start_daemon(tmp_path, users, capture, "--rules", str(rules)) as server:
        send(server, b"Subject: relayed\r\n\r\nhi\r\n", login=False)
    ((_, message),) = captured_messages(capture)
    assert b"Message-ID" not in message and b"\r\nDate:" not in message
    assert message.endswith(b"\r\nSubject: relayed\r\n\r\nhi\r\n")
