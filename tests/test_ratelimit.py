"""LoginLimiter with the in-memory store: lockouts, growing back-off, window expiry, memory cap."""

from __future__ import annotations

import asyncio
import time

import pytest

from ofmipd.errors import ConfigError
from ofmipd.ratelimit import (
    LoginLimiter,
    MemoryStore,
    RedisStore,
    ip_key,
    parse_ratelimit,
    user_key,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: Clock, **options: float) -> LoginLimiter:
    settings = {"max_failures": 3, "window": 60.0, "base_backoff": 10.0, "max_backoff": 40.0}
    settings.update(options)
    return LoginLimiter(MemoryStore(clock=clock), clock=clock, **settings)  # type: ignore[arg-type]


def test_n_failures_lock_the_ip_then_it_unlocks() -> None:
    clock = Clock()
    rl = limiter(clock)

    async def run() -> None:
        for _ in range(2):
            assert await rl.check("192.0.2.7", "alice") is None
            assert await rl.failed("192.0.2.7", "alice") is None
        started = await rl.failed("192.0.2.7", "alice")
        assert started is not None and started.retry_after == 10
        refusal = await rl.check("192.0.2.7", None)
        assert refusal is not None
        assert refusal.key == "ip"
        assert refusal.reason == "too many failures from 192.0.2.7, retry in 10s"
        assert await rl.check("192.0.2.8", "bob") is None  # other clients unaffected
        clock.now += 9.5
        refusal = await rl.check("192.0.2.7", "bob")
        assert refusal is not None and refusal.retry_after == 1
        clock.now += 0.5
        assert await rl.check("192.0.2.7", "bob") is None

    asyncio.run(run())


def test_backoff_doubles_on_repeated_lockouts_up_to_max() -> None:
    clock = Clock()
    rl = limiter(clock)

    async def lock_out() -> int:
        for _ in range(2):
            assert await rl.failed("192.0.2.7", None) is None
        started = await rl.failed("192.0.2.7", None)
        assert started is not None
        clock.now += started.retry_after
        return started.retry_after

    async def run() -> list[int]:
        return [await lock_out() for _ in range(5)]

    assert asyncio.run(run()) == [10, 20, 40, 40, 40]


def test_lockout_level_is_forgotten_after_a_quiet_max_backoff() -> None:
    clock = Clock()
    rl = limiter(clock)

    async def run() -> tuple[int, int]:
        for _ in range(3):
            first = await rl.failed("192.0.2.7", None)
        assert first is not None
        clock.now += first.retry_after + 40 + 1  # lock over, then max_backoff of calm
        for _ in range(3):
            again = await rl.failed("192.0.2.7", None)
        assert again is not None
        return first.retry_after, again.retry_after

    assert asyncio.run(run()) == (10, 10)


def test_failures_outside_the_window_do_not_add_up() -> None:
    clock = Clock()
    rl = limiter(clock)

    async def run() -> None:
        assert await rl.failed("192.0.2.7", "alice") is None
        assert await rl.failed("192.0.2.7", "alice") is None
        clock.now += 61  # the window that opened with the first failure has closed
        assert await rl.failed("192.0.2.7", "alice") is None
        assert await rl.failed("192.0.2.7", "alice") is None
        assert await rl.check("192.0.2.7", "alice") is None
        assert await rl.failed("192.0.2.7", "alice") is not None  # 3 in the new window

    asyncio.run(run())


def test_user_limit_triggers_across_different_ips() -> None:
    clock = Clock()
    rl = limiter(clock)

    async def run() -> None:
        for n in range(3):
            assert await rl.check(f"198.51.100.{n}", "Alice") is None
            await rl.failed(f"198.51.100.{n}", "Alice")
        refusal = await rl.check("203.0.113.9", "alice")  # case-folded: same user
        assert refusal is not None
        assert refusal.key == "user"
        assert refusal.reason.startswith("too many failures for this user name")
        assert "203.0.113.9" not in refusal.reason  # fail2ban must not ban the owner's IP
        assert await rl.check("203.0.113.9", "bob") is None

    asyncio.run(run())


def test_success_resets_the_user_but_not_the_ip() -> None:
    clock = Clock()
    rl = limiter(clock)

    async def run() -> None:
        await rl.failed("192.0.2.7", "alice")
        await rl.failed("192.0.2.7", "alice")
        await rl.succeeded("192.0.2.7", "alice")
        await rl.failed("192.0.2.9", "alice")
        await rl.failed("192.0.2.9", "alice")
        assert await rl.check(None, "alice") is None  # 2 since the success, not 4
        started = await rl.failed("192.0.2.7", "mallory")  # third from this IP
        assert started is not None and started.key == "ip"

    asyncio.run(run())


def test_ipv6_clients_are_counted_per_64() -> None:
    assert ip_key("2001:db8:1:2::1") == ip_key("2001:db8:1:2:ffff::9") == "ip:2001:db8:1:2::/64"
    assert ip_key("2001:db8:1:3::1") != ip_key("2001:db8:1:2::1")
    assert ip_key("::ffff:192.0.2.7") == ip_key("192.0.2.7") == "ip:192.0.2.7"
    assert user_key("Alice") == user_key("alice") != user_key("alice ")
    assert "alice" not in user_key("alice")


def test_memory_is_capped_least_recently_used_first() -> None:
    clock = Clock()
    store = MemoryStore(max_entries=100, clock=clock)
    rl = LoginLimiter(store, max_failures=2, window=60, base_backoff=10, clock=clock)

    async def run() -> None:
        await rl.failed("192.0.2.1", None)
        await rl.failed("192.0.2.1", None)  # locked
        for n in range(150):
            clock.now += 0.01
            await rl.failed(f"10.0.{n // 256}.{n % 256}", None)
            assert len(store) <= 100
        assert len(store) == 100
        # the oldest, least recently touched key was evicted first
        assert await rl.check("192.0.2.1", None) is None
        assert await store.locked([ip_key("10.0.0.149")]) == [0.0]

    asyncio.run(run())


def test_expired_keys_are_dropped() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    rl = LoginLimiter(
        store, max_failures=3, window=60, base_backoff=10, max_backoff=40, clock=clock
    )

    async def run() -> None:
        for n in range(50):
            await rl.failed(f"10.0.0.{n}", None)
        assert len(store) == 50
        clock.now += 61
        await rl.failed("192.0.2.1", None)
        assert len(store) == 1

    asyncio.run(run())


def test_failure_delay_sleeps_configured_time() -> None:
    rl = LoginLimiter(MemoryStore(), failure_delay=0.2)
    start = time.monotonic()
    asyncio.run(rl.failure_delay())
    assert time.monotonic() - start >= 0.19


def test_parse_ratelimit_specs_and_options() -> None:
    assert parse_ratelimit(None) is None
    assert parse_ratelimit("off") is None
    memory = parse_ratelimit("memory", {"max_failures": 7, "window": "300", "fail_open": False})
    assert memory is not None
    assert isinstance(memory.store, MemoryStore)
    assert memory.policy.max_failures == 7 and memory.policy.window == 300.0
    assert not memory.fail_open
    from_table = parse_ratelimit(None, {"store": "memory", "max_entries": 10})
    assert from_table is not None and isinstance(from_table.store, MemoryStore)
    assert from_table.store.max_entries == 10
    remote = parse_ratelimit("redis://127.0.0.1:6379/2", {"timeout": 0.25})
    assert remote is not None and isinstance(remote.store, RedisStore)
    assert remote.store.timeout == 0.25
    assert "fail open" in remote.describe()
    cases: list[tuple[str, dict[str, object], str]] = [
        ("memcached://x", {}, "unknown store"),
        ("memory", {"max_failurs": 3}, "unknown option"),
        ("memory", {"max_failures": 0}, "out of range"),
        ("memory", {"window": "soon"}, "must be a number"),
        ("memory", {"fail_open": "yes"}, "true or false"),
        ("memory", {"base_backoff": 100, "max_backoff": 10}, "max_backoff"),
        ("memory", {"timeout": 1}, "redis:// stores only"),
        ("redis://127.0.0.1/0", {"max_entries": 5}, "memory store only"),
    ]
    for spec, options, words in cases:
        with pytest.raises(ConfigError, match=words):
            parse_ratelimit(spec, options)
