"""Password-guessing resistance: lock out a client IP or a user name after repeated AUTH failures.

After `max_failures` rejected logins within `window` seconds, a key (the client's IP, or
the user name) is locked for a back-off that doubles with each lockout, from
`base_backoff` up to `max_backoff`. While locked, AUTH is refused before any backend
runs, so a locked-out guesser costs no PAM, LDAP or bcrypt work. The number of lockouts
is remembered for `max_backoff` seconds after the last one ends, so a slow guesser keeps
climbing the ladder.

Counters live in a store: in memory (one process, bounded, the default) or in Redis, so
that several ofmipd nodes behind one balancer share what they have seen. If Redis cannot
be reached, the limiter fails open (logins proceed unlimited) or closed (AUTH refused)
as configured, and says which in the log at most once a minute.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ipaddress
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ofmipd.errors import ConfigError

log = logging.getLogger("ofmipd.ratelimit")


@dataclass(frozen=True)
class Policy:
    max_failures: int = 5
    window: float = 600.0
    base_backoff: float = 60.0
    max_backoff: float = 3600.0

    def backoff(self, level: int) -> float:
        """Seconds locked after the level-th lockout (1, 2, ...): base, 2*base, ... max."""
        return min(self.base_backoff * 2.0 ** min(level - 1, 60), self.max_backoff)

    @property
    def memory(self) -> float:
        """How long the lockout level outlives the lockout that raised it."""
        return self.max_backoff


@dataclass(frozen=True)
class Refusal:
    """Why an AUTH is refused without asking any backend."""

    reason: str  # for the admin's log line; fail2ban matches "too many failures from "
    retry_after: int  # seconds
    key: str  # "ip", "user" or "store" (the limiter's store is down and fails closed)


class StoreDown(Exception):
    """The store could not answer (Redis unreachable or too slow)."""


class Store(Protocol):
    name: str

    async def locked(self, keys: Sequence[str]) -> list[float]:
        """Seconds each key stays locked (0 if not locked)."""
        ...

    async def fail(self, key: str, policy: Policy) -> float:
        """Count one failure; the seconds of a lockout it started, else 0."""
        ...

    async def clear(self, key: str) -> None: ...

    async def close(self) -> None: ...


@dataclass
class _Entry:
    failures: int = 0
    window_end: float = 0.0  # a fixed window opens with the first failure, as in Redis
    level: int = 0
    level_end: float = 0.0
    locked_until: float = 0.0

    def dead(self, now: float) -> bool:
        return now >= self.window_end and now >= self.level_end and now >= self.locked_until


class MemoryStore:
    """Counters in this process: bounded to max_entries keys, least recently used go first."""

    name = "memory"

    def __init__(
        self, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries < 1:
            raise ConfigError("ratelimit: max_entries must be at least 1")
        self.max_entries = max_entries
        self.clock = clock
        self._entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def _get(self, key: str, now: float) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None and entry.dead(now):
            del self._entries[key]
            return None
        return entry

    async def locked(self, keys: Sequence[str]) -> list[float]:
        now = self.clock()
        result = []
        for key in keys:
            entry = self._get(key, now)
            result.append(max(0.0, entry.locked_until - now) if entry else 0.0)
        return result

    async def fail(self, key: str, policy: Policy) -> float:
        now = self.clock()
        entry = self._get(key, now)
        if entry is None:
            self._trim(now, room=1)
            entry = self._entries[key] = _Entry()
        self._entries.move_to_end(key)
        if now >= entry.window_end:
            entry.failures, entry.window_end = 0, now + policy.window
        if now >= entry.level_end:
            entry.level = 0
        entry.failures += 1
        if entry.failures < policy.max_failures:
            return 0.0
        entry.failures, entry.window_end = 0, 0.0
        entry.level += 1
        backoff = policy.backoff(entry.level)
        entry.locked_until = now + backoff
        entry.level_end = entry.locked_until + policy.memory
        return backoff

    def _trim(self, now: float, room: int) -> None:
        # Expired keys at the cold end go first; then the least recently failed, so a
        # flood of addresses costs bounded memory (and can only evict, never lock out).
        while self._entries:
            key, oldest = next(iter(self._entries.items()))
            if not oldest.dead(now) and len(self._entries) + room <= self.max_entries:
                return
            del self._entries[key]

    async def clear(self, key: str) -> None:
        self._entries.pop(key, None)

    async def close(self) -> None:
        self._entries.clear()


# One round trip, atomic: count the failure in a window that opens with the first one;
# at the threshold, raise the level and set the lock. Times in milliseconds (PX).
_FAIL_SCRIPT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if n < tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
local level = redis.call('INCR', KEYS[2])
if level > 60 then level = 60 end
local backoff = math.floor(math.min(tonumber(ARGV[3]) * 2 ^ (level - 1), tonumber(ARGV[4])))
if backoff < 1 then backoff = 1 end
redis.call('SET', KEYS[3], '1', 'PX', backoff)
redis.call('PEXPIRE', KEYS[2], backoff + tonumber(ARGV[5]))
return backoff
"""


class RedisStore:
    """Counters in Redis, shared by every ofmipd node that names the same server."""

    name = "redis"

    def __init__(self, url: str, timeout: float = 0.5, key_prefix: str = "ofmipd:rl:") -> None:
        try:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
            from redis.exceptions import RedisError
        except ImportError as error:
            raise ConfigError(
                "ratelimit: a redis:// store needs the redis package (pip install redis)"
            ) from error
        self.url = url
        self.timeout = timeout
        self.key_prefix = key_prefix
        self._errors: tuple[type[BaseException], ...] = (RedisError, TimeoutError, OSError)
        from ofmipd.logs import redact_url
        from ofmipd.urls import split_url

        split_url(url, "ratelimit: Redis URL")  # brackets and port, the password hidden
        try:
            # No retries: a login must not wait for Redis to come back; fail open/closed.
            self._redis = aioredis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0),
            )
        except ValueError as error:
            raise ConfigError(f"ratelimit: bad Redis URL {redact_url(url)!r}: {error}") from None
        self._fail = self._redis.register_script(_FAIL_SCRIPT)

    def _keys(self, key: str) -> list[str]:
        # The {hash tag} keeps one key's three entries in one Redis Cluster slot.
        base = f"{self.key_prefix}{{{key}}}"
        return [base + ":f", base + ":l", base + ":x"]

    async def _run(self, work: Any) -> Any:
        try:
            return await asyncio.wait_for(work, self.timeout * 2)
        except self._errors as error:
            raise StoreDown(f"{type(error).__name__}: {error}".rstrip(": ")) from error

    async def locked(self, keys: Sequence[str]) -> list[float]:
        async def ask() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.pttl(self._keys(key)[2])
                return list(await pipe.execute())

        return [max(0, int(ms)) / 1000.0 for ms in await self._run(ask())]

    async def fail(self, key: str, policy: Policy) -> float:
        args = [
            policy.max_failures,
            max(1, int(policy.window * 1000)),
            int(policy.base_backoff * 1000),
            int(policy.max_backoff * 1000),
            int(policy.memory * 1000),
        ]
        ms = await self._run(self._fail(keys=self._keys(key), args=args))
        return int(ms) / 1000.0

    async def clear(self, key: str) -> None:
        await self._run(self._redis.delete(*self._keys(key)))

    async def close(self) -> None:
        await self._redis.aclose()


def ip_key(ip: str) -> str:
    """The key of a client address: IPv6 by /64, since one attacker holds a whole /64."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return "ip:" + ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"ip:{address.ipv4_mapped}"
        return f"ip:{ipaddress.IPv6Network((address, 64), strict=False)}"
    return f"ip:{address}"


def user_key(user: str) -> str:
    """The key of a user name: case-folded (backends often ignore case) and hashed, so any
    bytes are a safe key and Redis does not hold a list of user names."""
    digest = hashlib.sha256(user.casefold().encode("utf-8", "surrogateescape")).hexdigest()
    return "user:" + digest[:32]


class LoginLimiter:
    """The facade the SMTP layer calls around each AUTH."""

    def __init__(
        self,
        store: Store,
        max_failures: int = 5,
        window: float = 600.0,
        base_backoff: float = 60.0,
        max_backoff: float = 3600.0,
        fail_open: bool = True,
        failure_delay: float = 1.0,
        log_interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_failures < 1:
            raise ConfigError("ratelimit: max_failures must be at least 1")
        if window <= 0 or base_backoff <= 0 or max_backoff < base_backoff:
            raise ConfigError(
                "ratelimit: window and base_backoff must be positive, max_backoff >= base_backoff"
            )
        if failure_delay < 0:
            raise ConfigError("ratelimit: failure_delay must not be negative")
        self.store = store
        self.policy = Policy(max_failures, window, base_backoff, max_backoff)
        self.fail_open = fail_open
        self.delay = failure_delay
        self.log_interval = log_interval
        self.clock = clock
        self._down_since: float | None = None
        self._last_down_log = -math.inf

    def describe(self) -> str:
        target = getattr(self.store, "url", self.store.name)
        return (
            f"{target}: {self.policy.max_failures} failures in {self.policy.window:g}s lock for "
            f"{self.policy.base_backoff:g}s doubling to {self.policy.max_backoff:g}s, "
            f"fail {'open' if self.fail_open else 'closed'}"
        )

    async def check(self, ip: str | None, user: str | None) -> Refusal | None:
        """A Refusal if the IP or the user name is locked out; None means ask the backends.
        Call with user=None before the user name is known (e.g. at the AUTH command)."""
        keys = self._keys(ip, user)
        if not keys:
            return None
        try:
            remaining = await self.store.locked([key for _, key in keys])
        except StoreDown as error:
            self._store_down(error)
            if self.fail_open:
                return None
            return Refusal("rate limiter store unavailable, failing closed", 60, "store")
        self._store_up()
        for (kind, _), seconds in zip(keys, remaining, strict=True):
            if seconds > 0:
                return self._refusal(kind, ip, seconds)
        return None

    async def failed(self, ip: str | None, user: str | None) -> Refusal | None:
        """Count a REJECT (never a TEMPFAIL: an outage is not an attack). Returns the
        lockout this failure started, if any, for the log."""
        started: Refusal | None = None
        for kind, key in self._keys(ip, user):
            try:
                seconds = await self.store.fail(key, self.policy)
            except StoreDown as error:
                self._store_down(error)
                return None
            self._store_up()
            if seconds > 0 and (started is None or seconds > started.retry_after):
                started = self._refusal(kind, ip, seconds)
        return started

    async def succeeded(self, ip: str | None, user: str | None) -> None:
        """Forget the user name's failures, not the IP's: the owner of the password has
        shown up, but one valid account must not let its holder reset the counter of the
        address it is guessing other accounts from."""
        if not user:
            return
        try:
            await self.store.clear(user_key(user))
        except StoreDown as error:
            self._store_down(error)
            return
        self._store_up()

    async def failure_delay(self) -> None:
        """Slow each rejected or refused attempt down (the session waits, not the loop)."""
        if self.delay > 0:
            await asyncio.sleep(self.delay)

    async def close(self) -> None:
        await self.store.close()

    @staticmethod
    def _keys(ip: str | None, user: str | None) -> list[tuple[str, str]]:
        keys = []
        if ip:
            keys.append(("ip", ip_key(ip)))
        if user:
            keys.append(("user", user_key(user)))
        return keys

    @staticmethod
    def _refusal(kind: str, ip: str | None, seconds: float) -> Refusal:
        retry = max(1, math.ceil(seconds))
        if kind == "ip":
            # fail2ban's filter bans on this wording only: a locked user name must not get
            # its owner's address banned because someone else guessed at it.
            return Refusal(f"too many failures from {ip}, retry in {retry}s", retry, "ip")
        return Refusal(f"too many failures for this user name, retry in {retry}s", retry, "user")

    def _store_down(self, error: StoreDown) -> None:
        now = self.clock()
        if self._down_since is None:
            self._down_since = now
        if now - self._last_down_log >= self.log_interval:
            self._last_down_log = now
            log.error(
                "ratelimit: %s store unavailable (%s); failing %s",
                self.store.name,
                error,
                "open: logins are not rate-limited"
                if self.fail_open
                else "closed: AUTH is refused",
            )

    def _store_up(self) -> None:
        if self._down_since is not None:
            log.warning(
                "ratelimit: %s store reachable again after %.0fs",
                self.store.name,
                self.clock() - self._down_since,
            )
            self._down_since = None
            self._last_down_log = -math.inf


_NUMBERS = ("max_failures", "window", "base_backoff", "max_backoff", "failure_delay")


def parse_ratelimit(
    spec: str | None, options: Mapping[str, Any] | None = None
) -> LoginLimiter | None:
    """--ratelimit SPEC / TOML [ratelimit] store = SPEC plus options -> a LoginLimiter.

    SPEC is "memory", "redis://host:port/db" (also rediss://, unix://) or "off".
    Options: max_failures, window, base_backoff, max_backoff, failure_delay (seconds),
    fail_open (bool), max_entries (memory), timeout and key_prefix (redis).
    """
    options = dict(options or {})
    spec = options.pop("store", None) if spec is None else spec
    options.pop("store", None)
    if spec is None or spec.strip().lower() in ("", "off", "none"):
        return None
    spec = spec.strip()
    known = set(_NUMBERS) | {"fail_open", "max_entries", "timeout", "key_prefix"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"ratelimit: unknown option {unknown[0]!r}")
    limits: dict[str, Any] = {}
    for name in _NUMBERS:
        if name in options:
            limits[name] = _number(name, options[name], integer=name == "max_failures")
    if "fail_open" in options:
        if not isinstance(options["fail_open"], bool):
            raise ConfigError("ratelimit: fail_open must be true or false")
        limits["fail_open"] = options["fail_open"]
    store: Store
    if spec.lower() == "memory":
        if "timeout" in options or "key_prefix" in options:
            raise ConfigError("ratelimit: timeout and key_prefix apply to redis:// stores only")
        max_entries = _number("max_entries", options.get("max_entries", 100_000), integer=True)
        store = MemoryStore(max_entries=int(max_entries))
    elif spec.lower().startswith(("redis://", "rediss://", "unix://")):
        if "max_entries" in options:
            raise ConfigError("ratelimit: max_entries applies to the memory store only")
        timeout = _number("timeout", options.get("timeout", 0.5))
        prefix = options.get("key_prefix", "ofmipd:rl:")
        if not isinstance(prefix, str):
            raise ConfigError("ratelimit: key_prefix must be a string")
        store = RedisStore(spec, timeout=timeout, key_prefix=prefix)
    else:
        raise ConfigError(f"ratelimit: unknown store {spec!r} (use memory or redis://HOST:PORT/DB)")
    return LoginLimiter(store, **limits)


def _number(name: str, value: Any, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"ratelimit: {name} must be a number")
    try:
        number = int(value) if integer else float(value)
    except ValueError:
        raise ConfigError(f"ratelimit: {name} must be a number, not {value!r}") from None
    if number < 0 or (integer and number < 1) or not math.isfinite(number):
        raise ConfigError(f"ratelimit: {name} out of range: {value!r}")
    return number
