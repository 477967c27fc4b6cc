"""A slow login delays only its own session: other clients' banner and EHLO stay fast."""

from __future__ import annotations

import base64
import socket
import threading
import time

import pytest

from tests.conftest import free_port
from tests.ofmipd_server import CAPTURE, Daemon


def banner_and_ehlo_seconds(port: int) -> float:
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        sock.sendall(b"EHLO fast.test\r\n")
        while not reader.readline().startswith(b"250 "):
            pass
        elapsed = time.perf_counter() - started
        sock.sendall(b"QUIT\r\n")
    return elapsed


def slow_login(port: int, done: list[bytes]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        reader = sock.makefile("rb")
        reader.readline()
        blob = base64.b64encode(b"\0slow\0password")
        sock.sendall(b"EHLO slow.test\r\nAUTH PLAIN " + blob + b"\r\n")
        line = b""
        while not line.startswith((b"235", b"535", b"454")):
            line = reader.readline()
        done.append(line)


@pytest.mark.slow
def test_two_second_logins_do_not_delay_other_clients(tmp_path):
    port = free_port()
    # A checkpassword program that takes 2 s for every login: a real slow backend.
    daemon = Daemon(
        ["-p", f"127.0.0.1:{port}", "-A", "sleep 2; exit 1", "--sendmail", CAPTURE], port, tmp_path
    )
    try:
        baseline = min(banner_and_ehlo_seconds(port) for _ in range(5))
        done: list[bytes] = []
        slow = [threading.Thread(target=slow_login, args=(port, done)) for _ in range(3)]
        for thread in slow:
            thread.start()
        time.sleep(0.3)  # the slow logins are now in flight
        during = [banner_and_ehlo_seconds(port) for _ in range(5)]
        still_in_flight = not done
        for thread in slow:
            thread.join()
    finally:
        daemon.stop()
    assert still_in_flight, "the slow logins finished before we measured"
    assert [line[:3] for line in done] == [b"535"] * 3
    assert max(during) - baseline < 0.1, (baseline, during)
