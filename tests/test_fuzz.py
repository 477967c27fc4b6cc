"""Property-based fuzzing of the command parser and the AUTH exchange on a real daemon.

CI runs a bounded number of examples; OFMIPD_FUZZ_EXAMPLES=100000 runs a long one.
Every reply must be a well-formed SMTP reply, and the server must keep serving.
"""

from __future__ import annotations

import base64
import os
import re
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import free_port
from tests.ofmipd_server import CAPTURE, Daemon, server_env

EXAMPLES = int(os.environ.get("OFMIPD_FUZZ_EXAMPLES", "300"))
REPLY = re.compile(rb"^[2-5]\d\d[ -]")
# Replies after which the server closes the session.
GOODBYES = (
    b"221 ",  # QUIT
    b"421 ",  # a limit (errors, commands)
    b"502 5.5.1 Too many unrecognized",  # aiosmtpd's limit on unknown commands
    b"554 5.7.0 PROXY protocol not accepted",  # a PROXY line from a client not trusted
)
VERBS = [
    b"EHLO",
    b"HELO",
    b"AUTH",
    b"MAIL FROM:",
    b"RCPT TO:",
    b"DATA",
    b"RSET",
    b"NOOP",
    b"STARTTLS",
    b"VRFY",
    b"QUIT",
    b"AUTH PLAIN",
    b"AUTH LOGIN",
    b"AUTH CRAM-MD5",
    b"*",
]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    work = tmp_path_factory.mktemp("fuzz")
    users = work / "users"
    users.write_text("fuzz:fuzz-pw\n")
    users.chmod(0o600)
    capture = work / "capture"
    capture.mkdir()
    port = free_port()
    server = Daemon(
        [
            "-p",
            f"127.0.0.1:{port}",
            "-a",
            str(users),
            "--sendmail",
            CAPTURE,
            "--max-errors",
            "1000",
            "--max-per-ip",
            "50",
        ],
        port,
        work,
        env=server_env(CAPTURE_DIR=str(capture)),
    )
    try:
        yield server
        assert server.proc.poll() is None, "the server died during fuzzing"
        assert "Traceback" not in server.log_text()
    finally:
        server.stop()


line = st.one_of(
    st.binary(max_size=200).map(lambda b: b.replace(b"\n", b"")),
    st.tuples(st.sampled_from(VERBS), st.binary(max_size=80)).map(
        lambda t: t[0] + b" " + t[1].replace(b"\n", b"")
    ),
    st.binary(max_size=120).map(lambda b: base64.b64encode(b)),
    st.just(b"AUTH PLAIN " + base64.b64encode(b"\0fuzz\0fuzz-pw")),
)


def replies(sock: socket.socket) -> list[bytes]:
    """Everything up to the server's close; a hang fails the test by timeout."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return [x for x in data.split(b"\r\n") if x]


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(line, min_size=1, max_size=8))
def test_any_command_sequence_gets_wellformed_replies(daemon, lines):
    with socket.create_connection((daemon.host, daemon.port), timeout=10) as sock:
        # The tail ends any DATA or AUTH exchange the fuzz opened, then leaves.
        tail = b"\r\n.\r\nRSET\r\nQUIT\r\n"
        sock.sendall(b"EHLO fuzz.test\r\n" + b"".join(x + b"\r\n" for x in lines) + tail)
        got = replies(sock)
    assert got, "no reply at all"
    assert got[0].startswith(b"220 ")
    # Valid commands are really served: the opening EHLO, and the QUIT (the tail's or
    # one in the fuzz) -- a server that refused everything would still be "well-formed".
    # Only a reply that ends the session on purpose may come last instead.
    assert got[1].startswith(b"250"), got[:2]
    assert got[-1].startswith(GOODBYES), got
    for reply in got:
        assert REPLY.match(reply) or reply.startswith(b"334"), reply
    assert b"Traceback" not in b"".join(got)


def test_a_valid_session_is_accepted(daemon):
    """The fuzzed daemon delivers a well-formed message: the fuzz runs against a working
    server, not one that merely answers."""
    plain = base64.b64encode(b"\0fuzz\0fuzz-pw")
    session = [
        (b"EHLO valid.test", b"250 "),
        (b"AUTH PLAIN " + plain, b"235 "),
        (b"MAIL FROM:<fuzz@example.org>", b"250 "),
        (b"RCPT TO:<someone@example.net>", b"250 "),
        (b"DATA", b"354 "),
        (b"Subject: valid\r\n\r\nbody\r\n.", b"250 "),
        (b"QUIT", b"221 "),
    ]
    with socket.create_connection((daemon.host, daemon.port), timeout=10) as sock:
        stream = sock.makefile("rb")
        assert stream.readline().startswith(b"220 ")
        for command, expected in session:
            sock.sendall(command + b"\r\n")
            reply = stream.readline()
            while reply[3:4] == b"-":  # the last line of a multi-line reply has the code
                reply = stream.readline()
            assert reply.startswith(expected), (command, reply)
