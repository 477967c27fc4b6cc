"""--bare-newline end to end: what the injector and a Maildir receive from a client that
sends bare LF or CR, smuggling attempts included."""

from __future__ import annotations

import base64
import socket
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.ofmipd_server import (
    Daemon,
    authfile,
    captured_messages,
    ofmipd_command,
    server_env,
    start_daemon,
)

PASSWORD = "Bare-Newline-9"
AUTH = b"AUTH PLAIN " + base64.b64encode(b"\0erin\0" + PASSWORD.encode())
# A message whose lines end in bare LF and CR, with an SMTP smuggling attempt in it: a
# server that took <LF>.<LF> as the end would run the second transaction.
SMUGGLING = (
    b"Subject: first\n"
    b"X-Mixed: cr\r\rbody\n"
    b"..stuffed\n"
    b".\n"
    b"MAIL FROM:<ceo@example.org>\r\n"
    b"RCPT TO:<victim@example.net>\r\n"
    b"DATA\r\n"
    b"Subject: smuggled\r\n"
    b"\r\n"
    b"wire money\r.\r"
    b"end\r\n"
)


# These tests pin the message byte for byte; the RFC 6409 fix-ups are tests/test_fixups.py's.
NO_FIX_UPS = ("--no-add-message-id", "--no-add-date")


@pytest.fixture
def users(tmp_path: Path) -> Path:
    return authfile(tmp_path, f"erin:{PASSWORD}\n")


def send(daemon: Daemon, *messages: bytes) -> list[bytes]:
    """One session, one transaction per message (sent as is, then ".<CRLF>"): the
    reply to each message's end of data."""
    commands = b"EHLO client.test\r\n" + AUTH + b"\r\n"
    for message in messages:
        commands += b"MAIL FROM:<erin@example.org>\r\nRCPT TO:<friend@example.net>\r\nDATA\r\n"
        commands += message + b".\r\n"  # messages end in CRLF
    with socket.create_connection((daemon.host, daemon.port), timeout=20) as sock:
        sock.sendall(commands + b"QUIT\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    lines = data.split(b"\r\n")
    ends = [lines[i + 1] for i, line in enumerate(lines) if line.startswith(b"354 ")]
    assert len(ends) == len(messages), lines
    return ends


def only_crlf(data: bytes) -> bool:
    return data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")


def test_normalize_hands_the_injector_crlf_lines_and_the_smuggled_commands_as_content(
    tmp_path: Path, users: Path, capture: Path
) -> None:
    with start_daemon(tmp_path, users, capture, *NO_FIX_UPS) as daemon:
        replies = send(daemon, SMUGGLING)
        log = daemon.log_text()
    assert [r[:9] for r in replies] == [b"250 2.0.0"]
    ((env, message),) = captured_messages(capture)  # one message, not two
    assert "-- friend@example.net\n" in env and "victim" not in env
    assert only_crlf(message)
    body = message.split(b"Subject: first\r\n", 1)[1]
    assert body == (
        b"X-Mixed: cr\r\n\r\nbody\r\n.stuffed\r\n\r\n"
        b"MAIL FROM:<ceo@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nwire money\r\n\r\nend\r\n"
    )
    assert "Traceback" not in log


def test_reject_answers_550_and_delivers_nothing_then_the_session_goes_on(
    tmp_path: Path, users: Path, capture: Path
) -> None:
    config = tmp_path / "ofmipd.toml"
    config.write_text('bare_newline = "reject"\n')
    with start_daemon(tmp_path, users, capture, "--config", str(config), *NO_FIX_UPS) as daemon:
        clean = b"Subject: clean\r\n\r\nall CRLF\r\n"
        replies = send(daemon, SMUGGLING, b"Subject: cr\r\n\r\nbare\rcr\r\n", clean)
        log = daemon.log_text()
    assert replies[:2] == [
        b"550 5.5.2 Error: bare <LF> received",
        b"550 5.5.2 Error: bare <CR> received",
    ]
    assert replies[2].startswith(b"250 2.0.0")
    ((_, message),) = captured_messages(capture)
    assert message.endswith(clean)
    assert log.count("bare <LF> received (--bare-newline reject)") == 1


def test_maildir_gets_lf_lines_and_no_stray_cr(tmp_path: Path, users: Path) -> None:
    maildir = tmp_path / "Maildir"
    port = free_port()
    args = ["-p", f"127.0.0.1:{port}", "--hostname", "mx.test", "-a", str(users)]
    with Daemon([*args, "--maildir", str(maildir), *NO_FIX_UPS], port, tmp_path) as daemon:
        assert [r[:3] for r in send(daemon, SMUGGLING)] == [b"250"]
    (stored,) = (maildir / "new").iterdir()
    content = stored.read_bytes()
    assert b"\r" not in content
    assert content.split(b"Subject: first\n", 1)[1] == (
        b"X-Mixed: cr\n\nbody\n.stuffed\n\n"
        b"MAIL FROM:<ceo@example.org>\nRCPT TO:<victim@example.net>\nDATA\n"
        b"Subject: smuggled\n\nwire money\n\nend\n"
    )


@pytest.mark.parametrize("how", ["flag", "toml"])
def test_an_unknown_bare_newline_mode_is_one_line_and_exit_2(
    tmp_path: Path, users: Path, how: str
) -> None:
    import subprocess

    if how == "flag":
        args = ["--bare-newline", "sometimes"]
    else:
        config = tmp_path / "ofmipd.toml"
        config.write_text('bare_newline = "sometimes"\n')
        args = ["--config", str(config)]
    result = subprocess.run(
        ofmipd_command("--check-config", "-a", str(users), *args),
        capture_output=True,
        text=True,
        timeout=30,
        env=server_env(),
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "sometimes" in result.stderr and "normalize" in result.stderr
