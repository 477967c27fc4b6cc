"""Shared counters and small records: the Store interface, and the in-process MemoryStore.

A store keeps two kinds of state, keyed by opaque strings:

* windowed counters with reservations. `reserve()` checks every given Limit and, only
  if all have room, holds `units` against each of them (atomically, across processes
  for the shared stores), so N requests at once can never all pass a budget of fewer
  than N. `settle()` turns a hold into a charge (or just releases it). A Limit with a
  Ladder locks its key once the budget is spent, for a back-off that doubles with each
  lock (login guessing); one without a ladder refuses until its window ends (a quota).
  A hold expires by itself, so a process killed between reserve and settle leaks
  nothing for long.
* small records with a time to live (`put`, `get`): "this address logged in as this
  user", "this app password was last used then".

Stores: MemoryStore (this module: one process), SQLiteStore (ofmipd/store_sqlite.py:
processes on one host, the default) and RedisStore (ofmipd/store_redis.py: several
hosts). ofmipd/ratelimit.py chooses one; the stores know nothing of logins.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

from ofmipd.errors import ConfigError


class Ladder(NamedTuple):
    """Lock a key when its budget is spent: `base` seconds the first time, doubling per
    lock up to `max`. The level is remembered `memory` seconds after a lock ends."""

    base: float
    max: float
    memory: float

    def seconds(self, level: int) -> float:
        return min(self.base * 2.0 ** min(level - 1, 60), self.max)


class Limit(NamedTuple):
    key: str
    budget: int  # units per window
    window: float  # seconds; a window opens with the first charge
    ladder: Ladder | None = None  # None: a spent budget refuses until the window ends


class Grant(NamedTuple):
    """Units held against each limit until settle() (or `expires`, a wall-clock time)."""

    token: str
    limits: tuple[Limit, ...]
    units: int
    expires: float
    used: tuple[int, ...] = ()  # per limit, the units already charged in its window


class Blocked(NamedTuple):
    key: str  # the first limit without room
    seconds: float  # until it may have room again
    locked: bool  # True: locked or budget spent; False: only holds in flight fill it


class StoreDown(Exception):
    """The store could not answer (unreachable, unusable, too slow)."""


class Store(Protocol):
    name: str

    def describe(self) -> str:
        """Kind and place, for --check-config (no secrets)."""
        ...

    async def reserve(self, limits: Sequence[Limit], units: int, hold: float) -> Grant | Blocked:
        """Hold `units` against every limit for at most `hold` seconds, or none of them."""
        ...

    async def settle(
        self, grant: Grant, charge: int, keys: Sequence[str] | None = None
    ) -> list[float]:
        """Release the grant's holds and charge `charge` units to its limits (only to
        those in `keys`, if given). Per limit: the seconds of a lock this started, else 0."""
        ...

    async def forgive(self, keys: Sequence[str]) -> None:
        """Forget the units counted in the current windows (locks and levels stay)."""
        ...

    async def get(self, key: str) -> str | None: ...

    async def put(self, key: str, value: str, ttl: float) -> None: ...

    async def close(self) -> None: ...


def new_token() -> str:
    return os.urandom(9).hex()


class Counter:
    """One limit's state; the arithmetic every store shares (SQLite runs it in
    Python inside a transaction; Redis runs the same rules in Lua)."""

    __slots__ = ("used", "window_end", "level", "level_end", "locked_until", "holds")

    def __init__(
        self,
        used: int = 0,
        window_end: float = 0.0,
        level: int = 0,
        level_end: float = 0.0,
        locked_until: float = 0.0,
    ) -> None:
        self.used = used
        self.window_end = window_end
        self.level = level
        self.level_end = level_end
        self.locked_until = locked_until
        self.holds: dict[str, tuple[int, float]] = {}  # token -> (units, expires)

    def pending(self, now: float) -> tuple[int, float]:
        """Units held by live holds, and when the first of them expires."""
        for token in [t for t, (_, expires) in self.holds.items() if expires <= now]:
            del self.holds[token]
        if not self.holds:
            return 0, now
        return sum(u for u, _ in self.holds.values()), min(e for _, e in self.holds.values())

    def counted(self, now: float) -> int:
        return self.used if now < self.window_end else 0

    def check(self, limit: Limit, units: int, now: float) -> Blocked | None:
        if self.locked_until > now:
            return Blocked(limit.key, self.locked_until - now, True)
        used = self.counted(now)
        if limit.ladder is None and used + units > limit.budget:
            return Blocked(limit.key, self.window_end - now, True)
        held, first_expiry = self.pending(now)
        # A quota holds exactly what it may charge. A ladder only needs room left: the
        # guess that spends the budget locks the key, however far it overshoots.
        needed = units if limit.ladder is None else 1
        if used + held + needed > limit.budget:
            return Blocked(limit.key, max(first_expiry - now, 0.0), False)
        return None

    def charge(self, limit: Limit, units: int, now: float) -> float:
        if now >= self.window_end:
            self.used, self.window_end = 0, now + limit.window
        if now >= self.level_end:
            self.level = 0
        self.used += units
        ladder = limit.ladder
        if ladder is None or self.used < limit.budget:
            return 0.0
        self.used, self.window_end = 0, 0.0
        self.level += 1
        seconds = ladder.seconds(self.level)
        self.locked_until = now + seconds
        self.level_end = self.locked_until + ladder.memory
        return seconds

    def expires(self) -> float:
        """When this counter holds nothing worth keeping (holds aside)."""
        return max(self.window_end, self.level_end, self.locked_until)

    def protected(self, now: float) -> bool:
        """Locked, or held: what a flood of new keys must never push out."""
        return self.locked_until > now or self.pending(now)[0] > 0


class MemoryStore:
    """Counters and records in this process: for one daemon without --workers.

    Bounded to max_entries counters (and as many records). A flood of new keys evicts
    expired counters first, then the least recently used ones that are neither locked
    nor held: an attacker cannot flush the lock-outs by inventing addresses or names.
    Locked and held counters may fill up to twice the bound; only beyond that do the
    oldest of them go.
    """

    name = "memory"

    def __init__(
        self, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries < 1:
            raise ConfigError("ratelimit: max_entries must be at least 1")
        self.max_entries = max_entries
        self.clock = clock
        self._counters: collections.OrderedDict[str, Counter] = collections.OrderedDict()
        self._records: collections.OrderedDict[str, tuple[str, float]] = collections.OrderedDict()
        self._scan_at = max_entries

    def describe(self) -> str:
        return "memory"

    def __len__(self) -> int:
        return len(self._counters)

    def _counter(self, key: str, now: float, create: bool) -> Counter | None:
        counter = self._counters.get(key)
        if counter is not None:
            if counter.expires() <= now and not counter.protected(now):
                del self._counters[key]
                counter = None
            else:
                self._counters.move_to_end(key)
        if counter is None and create:
            self._make_room(now)
            counter = self._counters[key] = Counter()
        return counter

    def _make_room(self, now: float) -> None:
        counters = self._counters
        if len(counters) < self._scan_at:
            return
        # One pass per tenth of the bound in new keys, so a flood costs O(1) per key.
        target = self.max_entries * 9 // 10
        for key in list(counters):
            counter = counters[key]
            if counter.expires() <= now and not counter.protected(now):
                del counters[key]
        for key in list(counters):  # the least recently used first
            if len(counters) <= target:
                break
            if not counters[key].protected(now):
                del counters[key]
        while len(counters) >= 2 * self.max_entries:  # all locked or held: a hard bound
            counters.popitem(last=False)
        self._scan_at = max(self.max_entries, len(counters) + max(1, self.max_entries // 10))

    async def reserve(self, limits: Sequence[Limit], units: int, hold: float) -> Grant | Blocked:
        now = self.clock()
        for limit in limits:
            counter = self._counter(limit.key, now, create=False)
            if counter is not None:
                blocked = counter.check(limit, units, now)
                if blocked is not None:
                    return blocked
        token, used = new_token(), []
        for limit in limits:
            counter = self._counter(limit.key, now, create=True)
            assert counter is not None
            counter.holds[token] = (units, now + hold)
            used.append(counter.counted(now))
        return Grant(token, tuple(limits), units, now + hold, tuple(used))

    async def settle(
        self, grant: Grant, charge: int, keys: Sequence[str] | None = None
    ) -> list[float]:
        now = self.clock()
        started = []
        for limit in grant.limits:
            counter = self._counter(limit.key, now, create=charge > 0)
            seconds = 0.0
            if counter is not None:
                counter.holds.pop(grant.token, None)
                if charge > 0 and (keys is None or limit.key in keys):
                    seconds = counter.charge(limit, charge, now)
            started.append(seconds)
        return started

    async def forgive(self, keys: Sequence[str]) -> None:
        now = self.clock()
        for key in keys:
            counter = self._counter(key, now, create=False)
            if counter is not None:
                counter.used, counter.window_end = 0, 0.0

    async def get(self, key: str) -> str | None:
        found = self._records.get(key)
        if found is None:
            return None
        if found[1] <= self.clock():
            del self._records[key]
            return None
        self._records.move_to_end(key)
        return found[0]

    async def put(self, key: str, value: str, ttl: float) -> None:
        now = self.clock()
        self._records.pop(key, None)
        while len(self._records) >= self.max_entries:
            self._records.popitem(last=False)
        self._records[key] = (value, now + ttl)

    async def close(self) -> None:
        self._counters.clear()
        self._records.clear()
