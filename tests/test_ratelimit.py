"""LoginLimiter's policy, on the in-memory store: lockouts, back-off, reservations,
known-good addresses, partial rejects, user-name folding, the memory bound."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from limits_support import accepted, auth, malformed, partly_rejected, rejected, tempfailed

from ofmipd.errors import ConfigError
from ofmipd.ratelimit import (
    LoginLimiter,
    Refusal,
    Ticket,
    fold_user,
    ip_key,
    parse_ratelimit,
    user_key,
)
from ofmipd.store import MemoryStore
from ofmipd.store_redis import RedisStore
from ofmipd.store_sqlite import SQLiteStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: Clock, store: MemoryStore | None = None, **options: float) -> LoginLimiter:
    settings = {"max_failures": 3, "window": 60.0, "base_backoff": 10.0, "max_backoff": 40.0,
                "wait": 0.2}  # fmt: skip
    settings.update(options)
    store = MemoryStore(clock=clock) if store is None else store
    return LoginLimiter(store, clock=clock, **settings)  # type: ignore[arg-type]


def test_n_failures_lock_the_ip_then_it_unlocks() -> None:
    clock = Clock()
    rl = limiter(clock)

    async def run() -> None:
        for _ in range(2):
            assert await auth(rl, "192.0.2.7", "alice") == (None, None)
        refused, started = await auth(rl, "192.0.2.7", "alice")
        assert refused is None and started is not None and started.retry_after == 10
        refused, _ = await auth(rl, "192.0.2.7", "bob")
        assert refused is not None and refused.key == "ip"
        assert refused.reason == "too many failures from 192.0.2.7, retry in 10s"
        assert await auth(rl, "192.0.2.8", "bob") == (None, None)  # others unaffected
        clock.now += 9.5
        refused, _ = await auth(rl, "192.0.2.7", "carol")
        assert refused is not None and refused.retry_after == 1
        clock.now += 0.5
        assert await auth(rl, "192.0.2.7", "carol", accepted("carol")) == (None, None)

    asyncio.run(run())


def test_backoff_doubles_on_repeated_lockouts_up_to_max() -> None:
    clock = Clock()
    rl = limiter(clock)

    async def lock_out() -> int:
        for _ in range(2):
            assert await auth(rl, "192.0.2.7", None) == (None, None)
        _, started = await auth(rl, "192.0.2.7", None)
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
            _, first = await auth(rl, "192.0.2.7", None)
        assert first is not None
        clock.now += first.retry_after + 40 + 1  # lock over, then max_backoff of calm
        for _ in range(3):
            _, again = await auth(rl, "192.0.2.7", None)
        assert again is not None
        return first.retry_after, again.retry_after

    assert asyncio.run(run()) == (10, 10)


def test_failures_outside_the_window_do_not_add_up() -> None:
    clock = Clock()
    rl = limiter(clock)

    async def run() -> None:
        assert await auth(rl, "192.0.2.7", "alice") == (None, None)
        assert await auth(rl, "192.0.2.7", "alice") == (None, None)
        clock.now += 61  # the window that opened with the first failure has closed
        assert await auth(rl, "192.0.2.7", "alice") == (None, None)
        assert await auth(rl, "192.0.2.7", "alice") == (None, None)
        _, started = await auth(rl, "192.0.2.7", "alice")  # 3 in the new window
        assert started is not None

    asyncio.run(run())


def test_user_limit_triggers_across_different_ips() -> None:
    clock = Clock()
    rl = limiter(clock)

    async def run() -> None:
        for n in range(3):
            assert (await auth(rl, f"198.51.100.{n}", "Alice"))[0] is None
        refused, _ = await auth(rl, "203.0.113.9", "alice")  # case-folded: same user
        assert refused is not None and refused.key == "user"
        assert refused.reason.startswith("too many failures for this user name")
        assert "203.0.113.9" not in refused.reason  # fail2ban must not ban the owner's IP
        assert await auth(rl, "203.0.113.9", "bob") == (None, None)

    asyncio.run(run())


def test_success_resets_the_user_but_not_the_ip() -> None:
    clock = Clock()
    rl = limiter(clock)

    async def run() -> None:
        await auth(rl, "192.0.2.7", "alice")
        await auth(rl, "192.0.2.7", "alice")
        await auth(rl, "192.0.2.8", "alice", accepted())
        await auth(rl, "192.0.2.9", "alice")
        await auth(rl, "192.0.2.9", "alice")
        assert (await auth(rl, "192.0.2.10", "alice", accepted()))[0] is None  # 2, not 4
        _, started = await auth(rl, "192.0.2.7", "mallory")  # third from this IP
        assert started is not None and started.key == "ip"

    asyncio.run(run())


def test_ipv6_clients_are_counted_per_64() -> None:
    assert ip_key("2001:db8:1:2::1") == ip_key("2001:db8:1:2:ffff::9") == "ip:2001:db8:1:2::/64"
    assert ip_key("2001:db8:1:3::1") != ip_key("2001:db8:1:2::1")
    assert ip_key("::ffff:192.0.2.7") == ip_key("192.0.2.7") == "ip:192.0.2.7"
    assert "alice" not in user_key("alice")


def test_user_names_that_look_alike_share_one_counter() -> None:
    # NFKC + casefold, combining marks dropped: ALİCE casefolds to "i" + U+0307.
    same = ["alice", "ALICE", "Alice", "ａｌｉｃｅ", "ALİCE", "ÄLICE", "alice ", "Ａｌｉｃｅ"]
    assert {fold_user(name) for name in same} == {"alice"}
    assert len({user_key(name) for name in same}) == 1
    assert fold_user("al  ice") == fold_user("al\u00a0ice") == "al ice"
    assert user_key("alice") != user_key("alicia") != user_key("bob")
    assert user_key("\udcff\x00") != user_key("alice")  # any bytes make a key


def test_simultaneous_auths_reserve_at_most_max_failures_guesses() -> None:
    clock = Clock()
    rl = limiter(clock, wait=0.1)

    async def run() -> list[Ticket | Refusal]:
        return list(await asyncio.gather(*(rl.begin("192.0.2.7", "alice") for _ in range(10))))

    results = asyncio.run(run())
    assert sum(isinstance(r, Ticket) for r in results) == 3
    refusals = [r for r in results if isinstance(r, Refusal)]
    assert len(refusals) == 7 and {r.key for r in refusals} == {"busy"}
    # in flight is not a failure: not the wording fail2ban bans on
    assert all("too many failures" not in r.reason for r in refusals)


def test_a_waiting_auth_gets_room_when_another_is_released() -> None:
    clock = Clock()
    rl = limiter(clock, wait=5.0)

    async def run() -> Ticket | Refusal:
        held = [await rl.begin("192.0.2.7", "alice") for _ in range(3)]
        assert isinstance(held[0], Ticket)
        waiting = asyncio.ensure_future(rl.begin("192.0.2.7", "alice"))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await rl.settle(held[0], tempfailed())  # an outage: released, not counted
        return await waiting

    assert isinstance(asyncio.run(run()), Ticket)


def test_auths_waiting_for_room_get_it_in_order_of_arrival() -> None:
    # A busy NAT or webmail host: logins from one address keep coming, every one of them
    # right. Room comes up all the time, and the waiters must get it before newcomers,
    # or under steady load the first waiter can time out (454) while later ones pass.
    rl = limiter(Clock(), wait=2.0)  # 3 AUTHs of one address in flight at a time
    granted: list[int] = []

    async def login(number: int) -> Ticket | Refusal:
        result = await rl.begin("192.0.2.7", f"user{number}")
        if isinstance(result, Ticket):
            granted.append(number)
            await asyncio.sleep(0.02)  # the backend
            await rl.settle(result, accepted(f"user{number}"))
        return result

    async def run() -> list[Ticket | Refusal]:
        tasks = [asyncio.ensure_future(login(n)) for n in range(15)]  # a queue forms
        for number in range(15, 90):  # then newcomers, as fast as the backend answers
            await asyncio.sleep(0.007)
            tasks.append(asyncio.ensure_future(login(number)))
        return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    assert all(isinstance(r, Ticket) for r in results), [
        r for r in results if isinstance(r, Refusal)
    ]
    assert granted == sorted(granted)


def test_reservations_lock_waiters_out_once_they_fail() -> None:
    clock = Clock()
    rl = limiter(clock, wait=5.0)

    async def run() -> Ticket | Refusal:
        held = [await rl.begin("192.0.2.7", "alice") for _ in range(3)]
        waiting = asyncio.ensure_future(rl.begin("192.0.2.7", "alice"))
        await asyncio.sleep(0.2)
        for ticket in held:
            assert isinstance(ticket, Ticket)
            await rl.settle(ticket, rejected())
        return await waiting

    refusal = asyncio.run(run())
    assert isinstance(refusal, Refusal) and refusal.key == "ip"


def test_an_abandoned_or_orphaned_reservation_is_given_back() -> None:
    clock = Clock()
    rl = limiter(clock, wait=0.0, hold=30.0)

    async def run() -> None:
        held = [await rl.begin("192.0.2.7", None) for _ in range(3)]
        assert isinstance(await rl.begin("192.0.2.7", None), Refusal)
        assert isinstance(held[0], Ticket)
        rl.abandon(held[0])  # the client went away mid-chain
        await asyncio.sleep(0.01)
        assert isinstance(await rl.begin("192.0.2.7", None), Ticket)
        assert isinstance(await rl.begin("192.0.2.7", None), Refusal)
        clock.now += 30  # a process killed mid-AUTH never settles: its holds expire
        assert isinstance(await rl.begin("192.0.2.7", None), Ticket)

    asyncio.run(run())


def test_a_reject_next_to_a_tempfail_counts_a_quarter_and_a_pure_tempfail_nothing() -> None:
    clock = Clock()
    rl = limiter(clock)

    async def run() -> int:
        for _ in range(50):
            assert await auth(rl, "192.0.2.7", "alice", tempfailed()) == (None, None)
        guesses = 0
        while True:
            refused, started = await auth(rl, "192.0.2.7", "alice", partly_rejected())
            if refused is not None:
                assert refused.key == "ip"
                return guesses
            guesses += 1

    assert asyncio.run(run()) == 4 * 3  # four times max_failures


def test_known_good_address_is_exempt_from_its_users_lock_but_not_its_own() -> None:
    clock = Clock()
    rl = limiter(clock)

    async def run() -> None:
        assert await auth(rl, "192.0.2.10", "alice", accepted()) == (None, None)
        for _ in range(3):  # an attacker locks alice (and its own address)
            await auth(rl, "203.0.113.66", "alice")
        refused, _ = await auth(rl, "198.51.100.1", "alice", accepted())
        assert refused is not None and refused.key == "user"
        assert await auth(rl, "192.0.2.10", "ALICE", accepted()) == (None, None)
        refused, _ = await auth(rl, "203.0.113.66", "alice", accepted())
        assert refused is not None and refused.key == "ip"
        # failures from the known address count against the address, not against alice
        for _ in range(3):
            await auth(rl, "192.0.2.10", "alice")
        refused, _ = await auth(rl, "192.0.2.10", "alice", accepted())
        assert refused is not None and refused.key == "ip"
        clock.now += 10  # the address lock is over; the known-good record is not
        assert await auth(rl, "192.0.2.10", "alice", accepted()) == (None, None)
        clock.now += 31 * 86400  # a month later the record is gone
        for _ in range(3):
            await auth(rl, "203.0.113.67", "alice")
        refused, _ = await auth(rl, "192.0.2.10", "alice", accepted())
        assert refused is not None and refused.key == "user"

    asyncio.run(run())


def test_a_login_by_alias_makes_the_address_known_for_the_canonical_name_too() -> None:
    clock = Clock()
    rl = limiter(clock)

    async def run() -> None:
        # the backend accepted "al" and says the account is "alice"
        assert await auth(rl, "192.0.2.10", "al", accepted("alice")) == (None, None)
        for _ in range(3):
            await auth(rl, "203.0.113.66", "alice")
        assert await auth(rl, "192.0.2.10", "alice", accepted()) == (None, None)

    asyncio.run(run())


def test_a_malformed_attempt_counts_against_the_address_only() -> None:
    clock = Clock()
    rl = limiter(clock)

    async def run() -> None:
        for _ in range(2):
            assert await auth(rl, "192.0.2.7", "bob", malformed()) == (None, None)
        _, started = await auth(rl, "192.0.2.7", "bob", malformed())
        assert started is not None and started.key == "ip"
        # bob's counter was not touched: three more from elsewhere before bob locks
        for n in range(2):
            assert await auth(rl, f"198.51.100.{n}", "bob") == (None, None)
        assert (await auth(rl, "198.51.100.9", "bob"))[1] is not None

    asyncio.run(run())


def test_memory_store_flood_keeps_lockouts_and_holds() -> None:
    clock = Clock()
    store = MemoryStore(max_entries=100, clock=clock)
    rl = limiter(clock, store, wait=0.0)

    async def run() -> None:
        for _ in range(3):
            await auth(rl, "192.0.2.1", None)  # locked
        held = [await rl.begin("192.0.2.2", None) for _ in range(3)]  # full of holds
        assert all(isinstance(t, Ticket) for t in held)
        for n in range(5000):
            clock.now += 0.001
            await auth(rl, f"10.{n // 65536}.{n // 256 % 256}.{n % 256}", None)
            assert len(store) <= 200
        refused, _ = await auth(rl, "192.0.2.1", None)
        assert refused is not None and refused.key == "ip"
        refused, _ = await auth(rl, "192.0.2.2", None)
        assert refused is not None and refused.key == "busy"
        assert await auth(rl, "10.0.19.135", None) == (None, None)  # recent ones are kept

    asyncio.run(run())


def test_expired_keys_are_dropped_when_room_is_needed() -> None:
    clock = Clock()
    store = MemoryStore(max_entries=50, clock=clock)
    rl = limiter(clock, store)

    async def run() -> None:
        for n in range(50):
            await auth(rl, f"10.0.0.{n}", None)
        assert len(store) == 50
        clock.now += 61
        await auth(rl, "192.0.2.1", None)
        assert len(store) == 1

    asyncio.run(run())


def test_unusable_store_fails_open_to_memory_or_closed_in_one_log_line(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "state").symlink_to(target)  # another user's trick, or a mistake
    caplog.set_level(logging.INFO, logger="ofmipd.ratelimit")

    async def run(fail_open: bool) -> list[Refusal | None]:
        store = SQLiteStore(str(tmp_path / "state"))
        assert store.problem is not None and "symlink" in store.problem
        rl = LoginLimiter(store, max_failures=3, fail_open=fail_open, failure_delay=0)
        try:
            return [(await auth(rl, "192.0.2.7", "alice"))[0] for _ in range(5)]
        finally:
            await rl.close()

    opened = asyncio.run(run(True))
    assert opened[:3] == [None] * 3  # counted in memory: still limited
    assert all(r is not None and r.key == "ip" for r in opened[3:])
    closed = asyncio.run(run(False))
    assert all(r is not None and r.key == "store" for r in closed)
    down = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(down) == 2, down  # one line per limiter, not one per attempt
    assert "symlink" in down[0] and "failing open" in down[0] and "memory" in down[0]
    assert "failing closed: AUTH is refused" in down[1]
    assert not list(target.iterdir())  # nothing written through the symlink


def test_failure_delay_sleeps_configured_time() -> None:
    rl = LoginLimiter(MemoryStore(), failure_delay=0.2)
    start = time.monotonic()
    asyncio.run(rl.failure_delay())
    assert time.monotonic() - start >= 0.19


def test_parse_ratelimit_specs_and_options(tmp_path) -> None:
    assert parse_ratelimit("off") is None
    default = parse_ratelimit(None, state_dir=str(tmp_path / "state"))
    assert default is not None and isinstance(default.store, SQLiteStore)
    assert default.store.path == str(tmp_path / "state" / "ofmipd.db")
    memory = parse_ratelimit("memory", {"max_failures": 7, "window": "300", "fail_open": False})
    assert memory is not None
    assert isinstance(memory.store, MemoryStore)
    assert memory.policy.max_failures == 7 and memory.policy.window == 300.0
    assert not memory.fail_open
    from_table = parse_ratelimit(None, {"store": "memory", "max_entries": 10})
    assert from_table is not None and isinstance(from_table.store, MemoryStore)
    assert from_table.store.max_entries == 10
    remote = parse_ratelimit("redis://:s3cret@127.0.0.1:6379/2", {"timeout": 0.25})
    assert remote is not None and isinstance(remote.store, RedisStore)
    assert remote.store.timeout == 0.25
    assert "fail open" in remote.describe() and "s3cret" not in remote.describe()
    cases: list[tuple[str, dict[str, object], str]] = [
        ("memcached://:pw@x", {}, "unknown store 'memcached://:\\*\\*\\*@x'"),
        ("memory", {"max_failurs": 3}, "unknown option"),
        ("memory", {"max_failures": 0}, "out of range"),
        ("memory", {"window": "soon"}, "must be a number"),
        ("memory", {"fail_open": "yes"}, "true or false"),
        ("memory", {"base_backoff": 100, "max_backoff": 10}, "max_backoff"),
        ("memory", {"timeout": 1}, "redis:// stores only"),
        ("sqlite", {"key_prefix": "x"}, "redis:// stores only"),
        ("redis://127.0.0.1/0", {"max_entries": 5}, "memory store only"),
        ("sqlite", {"max_entries": 5}, "memory store only"),
    ]
    for spec, options, words in cases:
        with pytest.raises(ConfigError, match=words):
            parse_ratelimit(spec, options, state_dir=str(tmp_path / "state"))
