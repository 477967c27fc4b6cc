"""LoginLimiter on a real redis-server: shared between nodes, fail open/closed, recovery."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import redis_server as redis_support
from conftest import free_port
from limits_support import accepted, auth
from redis_server import RedisServer

from ofmipd.ratelimit import LoginLimiter, parse_ratelimit
from ofmipd.store_redis import RedisStore

redis_server = redis_support.redis_server  # the fixture, visible to this module


def node(url: str, fail_open: bool = True) -> LoginLimiter:
    limiter = parse_ratelimit(
        url,
        {"max_failures": 3, "window": 60, "base_backoff": 2, "max_backoff": 8,
         "fail_open": fail_open, "timeout": 0.5, "failure_delay": 0},
    )  # fmt: skip
    assert limiter is not None and isinstance(limiter.store, RedisStore)
    return limiter


@pytest.mark.slow
def test_two_nodes_sharing_redis_see_each_others_failures(redis_server: RedisServer) -> None:
    async def run() -> None:
        one, two = node(redis_server.url), node(redis_server.url)
        try:
            assert await auth(one, "192.0.2.7", "alice") == (None, None)
            assert await auth(two, "192.0.2.7", "bob") == (None, None)
            _, started = await auth(two, "192.0.2.7", "carol")  # third failure from this IP
            assert started is not None and started.key == "ip" and started.retry_after == 2
            refused, _ = await auth(one, "192.0.2.7", "dave")
            assert refused is not None and refused.key == "ip"
            assert refused.reason == "too many failures from 192.0.2.7, retry in 2s"
            # per-user across nodes and IPs
            for n, limiter in enumerate((one, two, one)):
                await auth(limiter, f"198.51.100.{n}", "Erin")
            refused, _ = await auth(two, "203.0.113.1", "erin")
            assert refused is not None and refused.key == "user"
            # success on one node clears the user for both; the IP stays counted
            await auth(one, "203.0.113.5", "frank")
            await auth(one, "203.0.113.5", "frank")
            assert await auth(two, "203.0.113.6", "frank", accepted("frank")) == (None, None)
            assert await auth(one, "203.0.113.7", "frank") == (None, None)
            _, started = await auth(one, "203.0.113.5", "frank")  # ip: third
            assert started is not None and started.key == "ip"
            # the known-good record is shared too
            for n in range(3):
                await auth(one, "203.0.113.66", "frank")
            refused, _ = await auth(one, "203.0.113.8", "frank", accepted("frank"))
            assert refused is not None and refused.key == "user"
            assert await auth(one, "203.0.113.6", "frank", accepted("frank")) == (None, None)
            # the lock expires by Redis' own clock, and the next lockout is twice as long
            await asyncio.sleep(2.2)
            for _ in range(2):
                assert await auth(one, "192.0.2.7", None) == (None, None)
            _, again = await auth(two, "192.0.2.7", None)
            assert again is not None and again.retry_after == 4
        finally:
            await one.close()
            await two.close()

    asyncio.run(run())


@pytest.mark.slow
def test_simultaneous_auths_on_two_nodes_share_one_budget(redis_server: RedisServer) -> None:
    async def run() -> int:
        one, two = node(redis_server.url), node(redis_server.url)
        try:
            results = await asyncio.gather(*(n.begin("192.0.2.9", "gina") for n in (one, two) * 6))
            return sum(not hasattr(r, "retry_after") for r in results)
        finally:
            await one.close()
            await two.close()

    assert asyncio.run(run()) == 3


def test_redis_down_fails_open_or_closed_and_says_so(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ofmipd.ratelimit")

    async def run() -> None:
        open_node = node(redis_server.url, fail_open=True)
        closed_node = node(redis_server.url, fail_open=False)
        try:
            for _ in range(3):
                await auth(open_node, "192.0.2.7", None)
            assert (await auth(closed_node, "192.0.2.7", None))[0] is not None

            redis_server.stop()
            start = time.monotonic()
            results = []
            for _ in range(5):
                results.append((await auth(open_node, "192.0.2.8", "alice"))[0])
                refused, _ = await auth(closed_node, "192.0.2.8", "alice")
                assert refused is not None and refused.key == "store"
                assert "failing closed" in refused.reason
            assert time.monotonic() - start < 10  # short timeouts, no retry loops
            # failing open falls back to this process's memory: still limited
            assert results[:3] == [None] * 3
            assert all(r is not None and r.key == "ip" for r in results[3:])
            down = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
            # one line per limiter, not one per attempt
            assert len(down) == 2, down
            assert any("failing open: logins are limited in this process" in x for x in down)
            assert any("failing closed: AUTH is refused" in line for line in down)

            redis_server.start()  # an empty Redis on the same port: the old lock is gone
            for _ in range(3):
                await auth(open_node, "192.0.2.9", None)
            assert (await auth(closed_node, "192.0.2.9", None))[0] is not None
            assert (await auth(closed_node, "192.0.2.10", None))[0] is None
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
            refused, _ = await auth(limiter, "192.0.2.7", "alice")
            assert refused is not None and refused.key == "store"
        finally:
            await limiter.close()

    with caplog.at_level(logging.ERROR, logger="ofmipd.ratelimit"):
        asyncio.run(run())
    assert "redis store unavailable" in caplog.text
