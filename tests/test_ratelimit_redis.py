"""LoginLimiter on a real redis-server: shared between nodes, fail open/closed, recovery."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port

from ofmipd.ratelimit import LoginLimiter, RedisStore, parse_ratelimit


class RedisServer:
    """A private redis-server on a loopback port; stop() and start() again on the same port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "redis-server exited"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self.process = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def node(url: str, fail_open: bool = True) -> LoginLimiter:
    limiter = parse_ratelimit(
        url,
        {"max_failures": 3, "window": 60, "base_backoff": 2, "max_backoff": 8,
         "fail_open": fail_open, "timeout": 0.5},
    )  # fmt: skip
    assert limiter is not None and isinstance(limiter.store, RedisStore)
    return limiter


def test_two_nodes_sharing_redis_see_each_others_failures(redis_server: RedisServer) -> None:
    async def run() -> None:
        one, two = node(redis_server.url), node(redis_server.url)
        try:
            assert await one.failed("192.0.2.7", "alice") is None
            assert await two.failed("192.0.2.7", "bob") is None
            assert await one.check("192.0.2.7", "carol") is None
            started = await two.failed("192.0.2.7", "carol")  # third failure from this IP
            assert started is not None and started.key == "ip" and started.retry_after == 2
            refusal = await one.check("192.0.2.7", "dave")
            assert refusal is not None and refusal.key == "ip"
            assert refusal.reason == "too many failures from 192.0.2.7, retry in 2s"
            # per-user across nodes and IPs
            for n, limiter in enumerate((one, two, one)):
                await limiter.failed(f"198.51.100.{n}", "Erin")
            refusal = await two.check("203.0.113.1", "erin")
            assert refusal is not None and refusal.key == "user"
            # success on one node clears the user for both; the IP stays counted
            await one.failed("203.0.113.5", "frank")
            await one.failed("203.0.113.5", "frank")
            await two.succeeded("203.0.113.5", "frank")
            assert await one.check(None, "frank") is None
            assert await one.failed("203.0.113.5", "frank") is not None  # ip: third
            # the lock expires by Redis' own clock, and the next lockout is twice as long
            await asyncio.sleep(2.2)
            assert await one.check("192.0.2.7", None) is None
            for _ in range(2):
                assert await one.failed("192.0.2.7", None) is None
            again = await two.failed("192.0.2.7", None)
            assert again is not None and again.retry_after == 4
        finally:
            await one.close()
            await two.close()

    asyncio.run(run())


def test_redis_down_fails_open_or_closed_and_says_so(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ofmipd.ratelimit")

    async def run() -> None:
        open_node = node(redis_server.url, fail_open=True)
        closed_node = node(redis_server.url, fail_open=False)
        try:
            for _ in range(3):
                await open_node.failed("192.0.2.7", None)
            assert await closed_node.check("192.0.2.7", None) is not None

            redis_server.stop()
            start = time.monotonic()
            for _ in range(5):
                assert await open_node.check("192.0.2.8", "alice") is None
                assert await open_node.failed("192.0.2.8", "alice") is None
                refusal = await closed_node.check("192.0.2.8", "alice")
                assert refusal is not None and refusal.key == "store"
                assert "failing closed" in refusal.reason
            assert time.monotonic() - start < 10  # short timeouts, no retry loops
            down = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
            # one line per limiter, not one per attempt
            assert len(down) == 2, down
            assert any("failing open: logins are not rate-limited" in line for line in down)
            assert any("failing closed: AUTH is refused" in line for line in down)

            redis_server.start()  # an empty Redis on the same port: the old lock is gone
            for _ in range(3):
                await open_node.failed("192.0.2.9", None)
            assert await closed_node.check("192.0.2.9", None) is not None
            assert await closed_node.check("192.0.2.10", None) is None
            back = [r.getMessage() for r in caplog.records if "reachable again" in r.getMessage()]
            assert len(back) == 2, back
        finally:
            await open_node.close()
            await closed_node.close()

    asyncio.run(run())


def test_unreachable_redis_at_start_fails_closed_quickly(caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nobody listens

    async def run() -> None:
        limiter = node(url, fail_open=False)
        try:
            refusal = await limiter.check("192.0.2.7", "alice")
            assert refusal is not None and refusal.key == "store"
        finally:
            await limiter.close()

    with caplog.at_level(logging.ERROR, logger="ofmipd.ratelimit"):
        asyncio.run(run())
    assert "redis store unavailable" in caplog.text
