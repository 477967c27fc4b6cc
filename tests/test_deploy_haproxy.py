"""conf/haproxy/ofmipd.cfg (daemonized haproxy, send-proxy-v2) in front of the daemon from
conf/systemd/ofmipd-behind-haproxy.service (--proxy-protocol 127.0.0.1)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
from collections.abc import Iterator

import pytest

from tests.conftest import free_port
from tests.deploy_support import (
    USERS_PATH,
    Workspace,
    exec_start,
    instantiate,
    msmtp,
    received,
    wait_for_banner,
    wait_for_pidfile,
)

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def ofmipd_argv(work: Workspace, port: int, trusted: str = "127.0.0.1") -> list[str]:
    return exec_start(
        "systemd/ofmipd-behind-haproxy.service",
        work.replacements(
            **{
                USERS_PATH: str(work.users),
                "-p 127.0.0.1:8025": f"-p 127.0.0.1:{port}",
                "--proxy-protocol 127.0.0.1": f"--proxy-protocol {trusted}",
                " -u ofmipd": "",  # the tests run as root and have no user ofmipd
            }
        ),
    )


@pytest.fixture
def stack(work: Workspace) -> Iterator[tuple[Workspace, int, int]]:
    backend = free_port()
    daemon = work.start(ofmipd_argv(work, backend), "ofmipd")
    wait_for_banner("127.0.0.1", backend, daemon)
    front = free_port()
    pidfile = work.root / "haproxy.pid"
    config = work.root / "haproxy.cfg"
    config.write_text(
        instantiate(
            "haproxy/ofmipd.cfg",
            {
                "bind 0.0.0.0:587": f"bind 127.0.0.1:{front}",
                "127.0.0.1:8025": f"127.0.0.1:{backend}",
                "/run/haproxy-ofmipd.pid": str(pidfile),
            },
        )
    )
    starter = work.start([HAPROXY, "-f", str(config)], "haproxy")
    pid = None
    try:
        assert starter.proc.wait(30) == 0, starter.log()  # "daemon": the parent returns
        pid = wait_for_pidfile(pidfile)
        wait_for_banner("127.0.0.1", front)
        yield work, front, backend
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
                time.sleep(0.05)
            if os.path.exists(f"/proc/{pid}"):
                os.kill(pid, signal.SIGKILL)
        print(daemon.log())


@pytest.mark.slow
def test_client_address_comes_through_haproxy(stack: tuple[Workspace, int, int]) -> None:
    work, front, _ = stack
    sent = msmtp(work.root, front, source_ip="127.0.0.6", tls="off")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    (message,) = work.messages()
    header = received(message)
    assert "[127.0.0.6]" in header and "with ESMTPA" in header, header


@pytest.mark.slow
def test_trusted_peer_without_header_is_disconnected(stack: tuple[Workspace, int, int]) -> None:
    _, _, backend = stack
    with socket.create_connection(("127.0.0.1", backend), timeout=30) as sock:
        sock.sendall(b"EHLO sneaky.test\r\n")
        assert sock.recv(100) == b""  # closed, no banner and no reply


def test_untrusted_peer_sending_a_header_is_refused_and_closed(work: Workspace) -> None:
    port = free_port()
    daemon = work.start(ofmipd_argv(work, port, trusted="127.0.0.9"), "ofmipd-untrusted")
    wait_for_banner("127.0.0.1", port, daemon)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        stream = sock.makefile("rb")
        assert stream.readline().startswith(b"220 ")  # served directly: banner first
        sock.sendall(b"PROXY TCP4 192.0.2.1 127.0.0.1 4000 25\r\n")
        assert stream.readline().startswith(b"554 5.7.0")
        assert stream.readline() == b""  # and the session is over
