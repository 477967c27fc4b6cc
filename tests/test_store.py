"""The Store contract, kept alike by the memory, SQLite and Redis (a real redis-server)
stores: reservations, settling, ladders and quotas, holds that expire, records."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from redis_server import RedisServer

from ofmipd.store import Blocked, Grant, Ladder, Limit, MemoryStore, Store
from ofmipd.store_redis import RedisStore
from ofmipd.store_sqlite import SQLiteStore

T = TypeVar("T")
LADDER = Ladder(base=2.0, max=8.0, memory=8.0)


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    made: Store
    server = None
    if request.param == "memory":
        made = MemoryStore()
    elif request.param == "sqlite":
        made = SQLiteStore(str(tmp_path / "state"))
    else:
        server = RedisServer(tmp_path)
        server.start()
        made = RedisStore(server.url, key_prefix="test:")
    try:
        yield made
    finally:
        if server is not None:
            server.stop()


def play(store: Store, test: Callable[[], Awaitable[T]]) -> T:
    """Run a test's coroutine, then close the store in the same event loop (a Redis
    client's connections belong to the loop that made them)."""

    async def run() -> T:
        try:
            return await test()
        finally:
            await store.close()

    return asyncio.run(run())


def ladder(key: str, budget: int = 12) -> Limit:
    return Limit(key, budget, 60.0, LADDER)


def test_holds_fill_a_ladder_budget_and_release_gives_room_back(store: Store) -> None:
    async def run() -> None:
        limit = ladder("ip:192.0.2.7")
        grants = [await store.reserve([limit], 4, 30.0) for _ in range(3)]
        assert all(isinstance(g, Grant) for g in grants)
        full = await store.reserve([limit], 4, 30.0)
        assert isinstance(full, Blocked) and not full.locked and full.key == limit.key
        assert 25 < full.seconds <= 30  # until the first hold would expire
        assert await store.settle(grants[0], 0) == [0.0]  # released, not charged
        assert isinstance(await store.reserve([limit], 4, 30.0), Grant)

    play(store, run)


@pytest.mark.slow
def test_charges_lock_at_the_budget_for_a_doubling_time(store: Store) -> None:
    async def run() -> None:
        limit = ladder("user:abc")
        for _ in range(2):
            grant = await store.reserve([limit], 4, 30.0)
            assert isinstance(grant, Grant)
            assert await store.settle(grant, 4) == [0.0]
        grant = await store.reserve([limit], 4, 30.0)
        assert isinstance(grant, Grant)
        assert await store.settle(grant, 4) == [2.0]  # the third spends 12: locked 2 s
        locked = await store.reserve([limit], 4, 30.0)
        assert isinstance(locked, Blocked) and locked.locked and 1 < locked.seconds <= 2
        await asyncio.sleep(2.1)
        for _ in range(2):
            grant = await store.reserve([limit], 4, 30.0)
            assert isinstance(grant, Grant)
            await store.settle(grant, 4)
        grant = await store.reserve([limit], 4, 30.0)
        assert isinstance(grant, Grant)
        assert await store.settle(grant, 4) == [4.0]  # the second lock: twice as long

    play(store, run)


def test_small_charges_leave_room_until_the_budget_is_spent(store: Store) -> None:
    async def run() -> int:
        limit = ladder("ip:192.0.2.8")
        for guesses in range(1, 100):
            grant = await store.reserve([limit], 4, 30.0)
            assert isinstance(grant, Grant), guesses
            if (await store.settle(grant, 1))[0] > 0:
                return guesses
        raise AssertionError("never locked")

    assert play(store, run) == 12


def test_a_reservation_takes_every_limit_or_none(store: Store) -> None:
    async def run() -> None:
        ip, user = ladder("ip:192.0.2.9", budget=8), ladder("user:full", budget=4)
        assert isinstance(await store.reserve([user], 4, 30.0), Grant)  # user now full
        blocked = await store.reserve([ip, user], 4, 30.0)
        assert isinstance(blocked, Blocked) and blocked.key == user.key
        # the address got no hold from the refused reservation: two fit
        assert isinstance(await store.reserve([ip], 4, 30.0), Grant)
        assert isinstance(await store.reserve([ip], 4, 30.0), Grant)
        assert isinstance(await store.reserve([ip], 4, 30.0), Blocked)

    play(store, run)


def test_settle_charges_only_the_keys_named(store: Store) -> None:
    async def run() -> None:
        ip, user = ladder("ip:192.0.2.10", budget=4), ladder("user:bob", budget=4)
        grant = await store.reserve([ip, user], 4, 30.0)
        assert isinstance(grant, Grant)
        assert await store.settle(grant, 4, [ip.key]) == [2.0, 0.0]
        assert isinstance(await store.reserve([user], 4, 30.0), Grant)
        assert isinstance(await store.reserve([ip], 4, 30.0), Blocked)

    play(store, run)


def test_holds_expire_on_their_own(store: Store) -> None:
    async def run() -> None:
        limit = ladder("ip:192.0.2.11", budget=4)
        assert isinstance(await store.reserve([limit], 4, 0.3), Grant)  # never settled
        assert isinstance(await store.reserve([limit], 4, 0.3), Blocked)
        await asyncio.sleep(0.5)
        assert isinstance(await store.reserve([limit], 4, 0.3), Grant)

    play(store, run)


def test_forgive_clears_the_count_but_not_a_lock(store: Store) -> None:
    async def run() -> None:
        limit, other = ladder("user:carol", budget=8), ladder("user:dave", budget=8)
        for key_limit in (limit, other):
            grant = await store.reserve([key_limit], 4, 30.0)
            assert isinstance(grant, Grant)
            await store.settle(grant, 4)
        grant = await store.reserve([other], 4, 30.0)
        assert isinstance(grant, Grant)
        assert (await store.settle(grant, 4))[0] > 0  # dave locked
        await store.forgive([limit.key, other.key, "user:nobody"])
        grant = await store.reserve([limit], 4, 30.0)
        assert isinstance(grant, Grant)
        assert await store.settle(grant, 4) == [0.0]  # 4 of 8 again, not 8
        assert isinstance(await store.reserve([other], 4, 30.0), Blocked)

    play(store, run)


def test_a_quota_refuses_until_its_window_ends(store: Store) -> None:
    async def run() -> None:
        quota = Limit("quota:alice", 3, 1.0)  # 3 messages a second, no ladder
        grant = await store.reserve([quota], 2, 30.0)
        assert isinstance(grant, Grant)
        assert isinstance(await store.reserve([quota], 2, 30.0), Blocked)  # 2 + 2 > 3
        assert await store.settle(grant, 2) == [0.0]
        assert isinstance(await store.reserve([quota], 1, 30.0), Grant)
        spent = await store.reserve([quota], 2, 30.0)
        assert isinstance(spent, Blocked) and spent.locked and spent.seconds <= 1.0
        await asyncio.sleep(1.1)
        assert isinstance(await store.reserve([quota], 2, 30.0), Grant)

    play(store, run)


def test_records_live_for_their_time(store: Store) -> None:
    async def run() -> None:
        assert await store.get("good:x") is None
        await store.put("good:x", "1", 0.4)
        await store.put("last:y", "2026-12-01T10:00:00Z", 60)
        assert await store.get("good:x") == "1"
        assert await store.get("last:y") == "2026-12-01T10:00:00Z"
        await asyncio.sleep(0.6)
        assert await store.get("good:x") is None
        assert await store.get("last:y") == "2026-12-01T10:00:00Z"

    play(store, run)
