"""A failed TLS handshake is one log line with the client's address and no traceback,
and `tls=yes` is only ever written after a handshake completed."""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.ofmipd_server import CAPTURE, Daemon, authfile, ofmipd_command, server_env, start_daemon
from tests.tls_support import client_context, make_certificate

PASSWORD = "Tls-Fail-31"


@pytest.fixture
def users(tmp_path: Path) -> Path:
    return authfile(tmp_path, f"tina:{PASSWORD}\n")


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    return make_certificate(tmp_path)


def client_hello() -> bytes:
    """The first flight of a real TLS client, from OpenSSL through memory BIOs."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def misbehave(port: int, source: str, payload: bytes, *, reset: bool, linger: float) -> None:
    sock = socket.socket()
    sock.settimeout(20)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    if payload:
        sock.sendall(payload)
    time.sleep(linger)
    if reset:  # an abortive close: RST instead of FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def lines_naming(log: str, address: str) -> list[str]:
    return [line for line in log.splitlines() if address in line]


def implicit_tls_daemon(tmp_path: Path, users: Path, cert: tuple[Path, Path], *args: str) -> Daemon:
    """--ssl with -d, and asyncio in debug mode: its own logger must not add tracebacks."""
    port = free_port()
    return Daemon(
        ["-p", f"127.0.0.1:{port}", "--hostname", "mx.test", "-a", str(users),
         "--sendmail", CAPTURE, "--ssl", "--ssl-cert", str(cert[0]), "--ssl-key", str(cert[1]),
         "-d", *args],
        port, tmp_path, env=server_env(CAPTURE_DIR=str(tmp_path), PYTHONASYNCIODEBUG="1"),
    )  # fmt: skip


def only_line_naming(log: str, address: str) -> str:
    lines = lines_naming(log, address)
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.slow
def test_each_failed_implicit_tls_handshake_is_one_line_without_traceback(tmp_path, users, cert):
    hello = client_hello()
    cases = {  # source address: (what the client sends, abortive close, expected error=)
        "127.0.0.2": (b"\x16\x03\x01\xff\xffnot a handshake" * 4, False, "error="),
        "127.0.0.3": (b"EHLO plain.test\r\n", False, "error=WRONG_VERSION_NUMBER"),
        "127.0.0.4": (hello[:40], True, "error=closed"),  # aborts mid-ClientHello
        "127.0.0.5": (hello, False, "error=closed"),  # leaves after its ClientHello
    }
    with implicit_tls_daemon(tmp_path, users, cert) as daemon:
        for source, (payload, reset, _) in cases.items():
            misbehave(daemon.port, source, payload, reset=reset, linger=0.3)
        with socket.create_connection(
            (daemon.host, daemon.port), timeout=20, source_address=("127.0.0.8", 0)
        ) as raw:
            with client_context(cert[0]).wrap_socket(raw, server_hostname="mx.test") as tls:
                assert tls.recv(100).startswith(b"220 ")
                tls.sendall(b"QUIT\r\n")
                tls.recv(100)
        time.sleep(0.5)
        log = daemon.log_text()
    assert "Traceback" not in log
    for source, (*_, error) in cases.items():
        line = only_line_naming(log, source)
        assert f"end client={source} " in line and " tls=no " in line, line
        assert "result=tls-failed" in line and error in line, line
    good = only_line_naming(log, "end client=127.0.0.8 ")
    assert " tls=yes " in good, good


@pytest.mark.slow
def test_a_handshake_timeout_is_one_line_without_traceback(tmp_path, users, cert):
    with implicit_tls_daemon(tmp_path, users, cert, "--ehlo-timeout", "1") as daemon:
        misbehave(daemon.port, "127.0.0.6", b"", reset=False, linger=2.5)
        time.sleep(0.3)
        log = daemon.log_text()
    assert "Traceback" not in log
    line = only_line_naming(log, "127.0.0.6")
    assert " tls=no " in line and "result=tls-failed" in line, line
    assert line.endswith(" error=timeout"), line


def test_failed_starttls_handshake_is_one_line_and_says_tls_no(tmp_path, users, cert, capture):
    with start_daemon(
        tmp_path, users, capture, "--tls", "optional", "--ssl-cert", str(cert[0]),
        "--ssl-key", str(cert[1]),
    ) as daemon:  # fmt: skip
        sock = socket.socket()
        sock.settimeout(20)
        sock.bind(("127.0.0.7", 0))
        sock.connect((daemon.host, daemon.port))
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b"EHLO starttls.test\r\n")
        while reader.readline()[3:4] == b"-":
            pass
        sock.sendall(b"STARTTLS\r\n")
        assert reader.readline().startswith(b"220 ")
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")  # anything but a ClientHello
        assert reader.read() == b""
        sock.close()
        time.sleep(0.5)
        log = daemon.log_text()
    assert "Traceback" not in log
    line = only_line_naming(log, "127.0.0.7")
    assert " tls=no " in line and "result=tls-failed" in line and "error=" in line, line


def test_one_session_failed_handshake_names_the_launchers_client(tmp_path, users, cert):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname(), timeout=20)
    conn, _ = listener.accept()
    env = server_env(TCPREMOTEIP="192.0.2.9", TCPREMOTEPORT="4321")
    process = subprocess.Popen(
        ofmipd_command(
            "-1", "--hostname", "mx.test", "-a", str(users), "--sendmail", CAPTURE, "--ssl",
            "--ssl-cert", str(cert[0]), "--ssl-key", str(cert[1]),
        ),
        stdin=conn, stdout=conn, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    conn.close()
    listener.close()
    client.sendall(b"EHLO plain.test\r\n")
    assert client.recv(100) == b""
    client.close()
    assert process.wait(30) == 0
    stderr = process.stderr.read().decode() if process.stderr else ""
    assert "Traceback" not in stderr
    line = only_line_naming(stderr, "192.0.2.9")
    assert "end client=192.0.2.9 port=4321 source=ucspi-env tls=no" in line, line
    assert "result=tls-failed" in line and line.endswith(" error=WRONG_VERSION_NUMBER"), line
