"""One-session mode (-1): the same session over a socketpair, two pipes, or a TCP socket."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import threading

import pytest

from tests.ofmipd_server import CAPTURE, captured_messages, ofmipd_command, server_env

PASSWORD = "Pipe-Secret-9"
PLAIN = base64.b64encode(f"\0carol\0{PASSWORD}".encode())
SCRIPT = [
    b"EHLO client.test\r\n",
    b"AUTH PLAIN " + PLAIN + b"\r\n",
    b"MAIL FROM:<carol@example.org>\r\n",
    b"RCPT TO:<dave@example.net>\r\n",
    b"DATA\r\n",
    b"Subject: one session\r\n\r\nhi\r\n.\r\n",
    b"QUIT\r\n",
]


@pytest.fixture
def setup(tmp_path):
    users = tmp_path / "users"
    users.write_text(f"carol:{PASSWORD}\n")
    users.chmod(0o400)
    capture = tmp_path / "capture"
    capture.mkdir()
    args = ofmipd_command("-1", "--hostname", "mx.test", "-a", str(users), "--sendmail", CAPTURE)
    return args, capture


def converse(read, write) -> list[bytes]:
    """Send each command after the previous reply; return the reply lines."""
    buffer = b""
    replies = []

    def reply() -> bytes:
        nonlocal buffer
        while True:
            while b"\r\n" in buffer:
                line, buffer = buffer.split(b"\r\n", 1)
                replies.append(line)
                if line[3:4] == b" ":
                    return line
            chunk = read()
            if not chunk:
                raise EOFError(b"\n".join(replies))
            buffer += chunk

    reply()  # banner
    for command in SCRIPT:
        write(command)
        reply()
    return replies


def check(replies: list[bytes]) -> None:
    assert replies[0] == b"220 mx.test ESMTP ofmipd"
    assert any(r.startswith(b"235 ") for r in replies), replies
    assert any(r.startswith(b"250 2.0.0 OK: queued as") for r in replies), replies
    assert replies[-1].startswith(b"221")


def test_socketpair_like_stunnel_exec(setup):
    args, capture = setup
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        args,
        stdin=theirs,
        stdout=theirs,
        stderr=subprocess.PIPE,
        env=server_env(CAPTURE_DIR=str(capture), REMOTE_HOST="192.0.2.44"),
    )
    theirs.close()
    ours.settimeout(20)
    check(converse(lambda: ours.recv(4096), ours.sendall))
    assert proc.wait(20) == 0
    ((_, message),) = captured_messages(capture)
    assert b"[192.0.2.44]" in message.split(b"Subject:")[0]


def test_two_pipes_like_inetd_nowait_pipe(setup):
    args, capture = setup
    proc = subprocess.Popen(
        args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=server_env(CAPTURE_DIR=str(capture)),
    )

    def write(data: bytes) -> None:
        proc.stdin.write(data)
        proc.stdin.flush()

    check(converse(lambda: os.read(proc.stdout.fileno(), 4096), write))
    assert proc.wait(20) == 0
    assert b"Traceback" not in proc.stderr.read()
    assert len(captured_messages(capture)) == 1


def test_real_accepted_tcp_socket_with_ucspi_environment(setup):
    args, capture = setup
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname(), timeout=20)
    conn, _ = listener.accept()
    env = server_env(
        CAPTURE_DIR=str(capture),
        TCPREMOTEIP="198.51.100.7",
        TCPREMOTEPORT="4321",
        TCPREMOTEHOST="client.example.net",
        TCPLOCALIP="127.0.0.1",
        PROTO="TCP",
    )
    proc = subprocess.Popen(args, stdin=conn, stdout=conn, stderr=subprocess.PIPE, env=env)
    conn.close()
    check(converse(lambda: client.recv(4096), client.sendall))
    assert proc.wait(20) == 0
    ((environment, message),) = captured_messages(capture)
    header = message.split(b"Subject:")[0]
    assert b"(client.example.net [198.51.100.7])" in header
    assert "TCPREMOTEIP=198.51.100.7" in environment
    listener.close()
    client.close()


def test_logs_never_go_to_stdout(setup):
    args, capture = setup
    proc = subprocess.Popen(
        [*args, "-d"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=server_env(CAPTURE_DIR=str(capture)),
    )
    out, err = proc.communicate(b"".join(SCRIPT), timeout=30)
    for line in out.split(b"\r\n"):
        assert line == b"" or line[:3].isdigit(), line
    assert b"session" in err  # the debug log went to stderr
    assert PASSWORD.encode() not in err and PLAIN not in err


def test_client_hangup_mid_session_exits_cleanly(setup):
    args, capture = setup
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        args,
        stdin=theirs,
        stdout=theirs,
        stderr=subprocess.PIPE,
        env=server_env(CAPTURE_DIR=str(capture)),
    )
    theirs.close()
    ours.recv(100)
    ours.sendall(
        b"EHLO x\r\nAUTH PLAIN " + PLAIN + b"\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n"
        b"DATA\r\nSubject: cut\r\n\r\npartial"
    )
    threading.Event().wait(0.5)
    ours.close()
    assert proc.wait(20) == 0
    assert b"Traceback" not in proc.stderr.read()
    assert captured_messages(capture) == []
