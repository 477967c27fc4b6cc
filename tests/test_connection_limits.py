"""Connection accounting on a real daemon: -C and --max-per-ip counts come back on every
exit, defaults that keep one address from taking every slot, the pre-EHLO deadline."""

from __future__ import annotations

import asyncio
import signal
import smtplib
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import BinaryIO

import pytest

from tests.ofmipd_server import CAPTURE, Daemon, authfile, ofmipd_command, server_env, start_daemon
from tests.tls_support import client_context, make_certificate

PASSWORD = "Limits-Pass-4"


@pytest.fixture
def users(tmp_path: Path) -> Path:
    return authfile(tmp_path, f"lena:{PASSWORD}\n")


def status(daemon: Daemon, timeout: float = 10.0) -> str:
    """Ask for the SIGUSR1 status line and return it."""
    before = daemon.log_text().count(" status: ")
    daemon.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [x for x in daemon.log_text().splitlines() if " status: " in x]
        if len(lines) > before:
            return lines[-1]
        time.sleep(0.05)
    raise TimeoutError("no status line")


def settled_status(daemon: Daemon, timeout: float = 15.0) -> str:
    """The status line once no connection is open any more (or the last one seen)."""
    deadline = time.monotonic() + timeout
    line = status(daemon)
    while " 0 of " not in line and time.monotonic() < deadline:
        time.sleep(0.2)
        line = status(daemon)
    return line


def connect(daemon: Daemon, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.settimeout(20)
    sock.bind((source, 0))
    sock.connect((daemon.host, daemon.port))
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except OSError:  # a reset is a close too
        pass
    return data


def proxied(daemon: Daemon, client_ip: str) -> tuple[socket.socket, bytes]:
    """A connection from the trusted proxy (127.0.0.1) naming CLIENT_IP; returns the
    socket and the first line the server sent (b"" if it closed)."""
    sock = connect(daemon)
    family, server = ("TCP6", "2001:db8::25") if ":" in client_ip else ("TCP4", "127.0.0.1")
    sock.sendall(f"PROXY {family} {client_ip} {server} 40000 587\r\n".encode())
    return sock, sock.makefile("rb").readline()


def test_plain_connects_and_garbage_handshakes_give_every_count_back(tmp_path, users, capture):
    cert, key = make_certificate(tmp_path)
    with start_daemon(
        tmp_path, users, capture, "--ssl", "--ssl-cert", str(cert), "--ssl-key", str(key),
        "--max-per-ip", "2",
    ) as daemon:  # fmt: skip
        for _ in range(100):  # port scanners and health checks: connect, close
            connect(daemon).close()
        for _ in range(100):  # not TLS at all; the server closes after the failed handshake
            sock = connect(daemon)
            try:
                sock.sendall(b"\x16\x03\x01\x00\x05junk!" + b"EHLO x\r\n" * 3)
            except OSError:
                pass  # refused already (--max-per-ip): the end state is what counts
            read_until_closed(sock)
            sock.close()
        time.sleep(0.5)  # the last failed handshake's end is handled
        with smtplib.SMTP_SSL(
            daemon.host, daemon.port, timeout=20, context=client_context(cert)
        ) as client:
            assert client.ehlo("tls.test")[0] == 250  # smtplib has read the 220 banner
            assert client.login("lena", PASSWORD)[0] == 235
        line = settled_status(daemon)
    assert "0 of 100 connection slots in use; per client address: none" in line, line
    assert "Traceback" not in daemon.log_text()


def test_max_per_ip_counts_the_client_a_trusted_proxy_names(tmp_path, users, capture):
    with start_daemon(
        tmp_path, users, capture, "--proxy-protocol", "127.0.0.1", "--max-per-ip", "2"
    ) as daemon:
        first, banner1 = proxied(daemon, "192.0.2.7")
        second, banner2 = proxied(daemon, "192.0.2.7")
        third, refusal = proxied(daemon, "192.0.2.7")
        other, banner3 = proxied(daemon, "192.0.2.8")  # the proxy's own address is not limited
        assert [banner1[:4], banner2[:4], banner3[:4]] == [b"220 "] * 3
        assert refusal.startswith(b"421 4.7.0"), refusal
        assert read_until_closed(third) == b""
        first.close()
        time.sleep(0.3)
        again, banner4 = proxied(daemon, "192.0.2.7")  # first's count came back
        assert banner4.startswith(b"220 ")
        for sock in (second, third, other, again):
            sock.close()
        line = settled_status(daemon)
    assert "refused 192.0.2.7: 2 sessions already" in daemon.log_text()
    assert "per client address: none" in line, line


def test_ipv6_clients_are_counted_per_64(tmp_path, users, capture):
    # One subscriber holds a whole /64: rotating addresses inside it is still one client.
    with start_daemon(
        tmp_path, users, capture, "--proxy-protocol", "127.0.0.1", "--max-per-ip", "2"
    ) as daemon:
        first, banner1 = proxied(daemon, "2001:db8:1:2::a")
        second, banner2 = proxied(daemon, "2001:db8:1:2:ffff::b")
        third, refusal = proxied(daemon, "2001:db8:1:2::c")
        neighbour, banner3 = proxied(daemon, "2001:db8:1:3::a")  # the next /64
        assert [banner1[:4], banner2[:4], banner3[:4]] == [b"220 "] * 3
        assert refusal.startswith(b"421 4.7.0"), refusal
        for sock in (first, second, third, neighbour):
            sock.close()
        line = settled_status(daemon)
    log = daemon.log_text()
    assert "refused 2001:db8:1:2::c: 2 sessions already in 2001:db8:1:2::/64" in log
    assert "per client address: none" in line, line


def test_early_exits_behind_a_proxy_give_their_counts_back(tmp_path, users, capture):
    rules = tmp_path / "rules"
    rules.write_text("192.0.2.66 deny\n* allow\n")
    with start_daemon(
        tmp_path, users, capture, "--proxy-protocol", "127.0.0.1", "--max-per-ip", "1",
        "-C", "4", "--ehlo-timeout", "1", "--rules", str(rules),
    ) as daemon:  # fmt: skip
        for _ in range(5):  # a rule deny: the next one is denied again, not over the limit
            sock, reply = proxied(daemon, "192.0.2.66")
            assert reply.startswith(b"554 5.7.1"), reply
            read_until_closed(sock)
            sock.close()
        for _ in range(5):  # a refused PROXY header
            sock = connect(daemon)
            sock.sendall(b"PROXY garbage\r\n")
            assert read_until_closed(sock) == b""
            sock.close()
        silent = [connect(daemon) for _ in range(4)]  # a PROXY header timeout, all -C slots
        for sock in silent:
            assert read_until_closed(sock) == b""
            sock.close()
        line = settled_status(daemon)
        sock, banner = proxied(daemon, "192.0.2.66")
        sock.close()
        sock, banner = proxied(daemon, "192.0.2.7")
        sock.close()
    assert "0 of 4 connection slots in use; per client address: none" in line, line
    assert banner.startswith(b"220 ")


def test_one_address_cannot_take_every_slot_by_default(tmp_path, users, capture):
    with start_daemon(tmp_path, users, capture) as daemon:
        time.sleep(0.5)  # the start-up probe's connection has ended
        held = [connect(daemon) for _ in range(10)]
        banners = [sock.makefile("rb").readline() for sock in held]
        eleventh = connect(daemon)
        refusal = eleventh.makefile("rb").readline()
        neighbour = connect(daemon, "127.0.0.2")
        welcome = neighbour.makefile("rb").readline()
        for sock in (*held, eleventh, neighbour):
            sock.close()
    assert all(b.startswith(b"220 ") for b in banners), banners
    assert refusal.startswith(b"421 4.7.0"), refusal
    assert welcome.startswith(b"220 "), welcome


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ((), "(connections 100)|10 sessions per client address, EHLO within 20s"),
        (("-C", "20"), "(connections 20)|5 sessions per client address"),
        (("-C", "2"), "(connections 2)|1 sessions per client address"),
        (("-C", "20", "--max-per-ip", "30"), "30 sessions per client address"),
        (("--ehlo-timeout", "7.5"), "EHLO within 7.5s"),
    ],
)
def test_check_config_shows_the_connection_limits(users, flags, expected):
    result = subprocess.run(
        ofmipd_command("--check-config", "-a", str(users), "--sendmail", CAPTURE, *flags),
        capture_output=True,
        text=True,
        timeout=60,
        env=server_env(),
    )
    assert result.returncode == 0, result.stderr
    for part in expected.split("|"):
        assert part in result.stdout, result.stdout


def last_reply_line(reader: BinaryIO) -> bytes:
    while True:
        line = reader.readline()
        if line[3:4] != b"-":
            return line


@pytest.mark.slow
def test_ehlo_timeout_is_a_deadline_that_noop_cannot_extend(tmp_path, users, capture):
    with start_daemon(
        tmp_path, users, capture, "--ehlo-timeout", "1.5", "--idle-timeout", "30"
    ) as daemon:
        greeted = connect(daemon)
        greeting = greeted.makefile("rb")
        assert greeting.readline().startswith(b"220 ")
        greeted.sendall(b"EHLO client.test\r\n")
        assert last_reply_line(greeting).startswith(b"250 ")
        ehlo_sent = time.monotonic()
        stalling = connect(daemon)
        opened = time.monotonic()
        reader = stalling.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        replies: list[bytes] = []
        while time.monotonic() - opened < 6:
            stalling.sendall(b"NOOP\r\n")
            line = reader.readline()
            replies.append(line)
            if not line.startswith(b"250"):
                break
            time.sleep(0.3)
        closed_after = time.monotonic() - opened
        # Greeted at once, then quiet for longer than the EHLO timeout: the idle timeout
        # (30 s) applies to it.
        time.sleep(max(0.0, ehlo_sent + 3 - time.monotonic()))
        greeted.sendall(b"NOOP\r\n")
        still_there = greeting.readline()
        stalling.close()
        greeted.close()
    assert replies[-1].startswith(b"421 4.4.2"), replies
    assert len(replies) >= 4, replies  # NOOPs were answered, and did not push it back
    assert 1.2 < closed_after < 4, closed_after
    assert still_there.startswith(b"250"), still_there


def test_proxy_header_and_tls_handshake_fall_under_the_ehlo_timeout(tmp_path, users, capture):
    cert, key = make_certificate(tmp_path)
    with start_daemon(
        tmp_path, users, capture, "--ssl", "--ssl-cert", str(cert), "--ssl-key", str(key),
        "--proxy-protocol", "127.0.0.1", "--ehlo-timeout", "1",
    ) as daemon:  # fmt: skip
        timings = []
        no_header = connect(daemon)
        no_handshake = connect(daemon)
        no_handshake.sendall(b"PROXY TCP4 192.0.2.9 127.0.0.1 40000 465\r\n")
        started = time.monotonic()
        results: list[bytes] = []

        def wait(sock: socket.socket) -> None:
            results.append(read_until_closed(sock))
            timings.append(time.monotonic() - started)

        threads = [threading.Thread(target=wait, args=(s,)) for s in (no_header, no_handshake)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        time.sleep(0.3)
        log = daemon.log_text()
    assert results == [b"", b""]
    assert max(timings) < 4, timings  # not the 10 s PROXY or 60 s handshake defaults
    assert "PROXY header from 127.0.0.1 refused: no complete PROXY header within 1s" in log, log
    (line,) = [x for x in log.splitlines() if "client=192.0.2.9" in x]
    assert "source=proxy-v1 tls=no" in line and "result=tls-failed" in line
    assert "error=timeout" in line, line


def test_an_internal_error_ends_the_connection_and_gives_its_count_back(users, monkeypatch):
    """A bug in ofmipd cannot be caused for real, so one is injected (the policy decision
    raises); the daemon runs in this process to see its connection table."""
    from ofmipd import listeners, smtp
    from ofmipd.assemble import build_app
    from ofmipd.cli import build_parser, config_from_args

    def broken(*_: object) -> None:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(smtp, "decide", broken)
    args = ["-a", str(users), "--sendmail", CAPTURE, "--max-per-ip", "1"]
    app = build_app(config_from_args(build_parser().parse_args(args)))

    async def run() -> tuple[list[bytes], str]:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        daemon = listeners.Daemon(app, [listener], lambda: app.config)
        accepting = asyncio.create_task(daemon.accept_loop(listener))
        seen = []
        for _ in range(3):  # with --max-per-ip 1, a kept count would refuse the next
            reader, writer = await asyncio.open_connection(*listener.getsockname())
            seen.append(await asyncio.wait_for(reader.read(), 5))
            writer.close()
        await asyncio.sleep(0.1)
        accepting.cancel()
        listener.close()
        return seen, daemon.table.describe()

    seen, table = asyncio.run(run())
    assert seen == [b"", b"", b""]  # closed at once, not after the idle timeout
    assert table == "0 of 100 connection slots in use; per client address: none"
