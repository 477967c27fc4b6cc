"""Password-guessing resistance: the login-limit policy around each AUTH.

On by default. Before any backend runs, an AUTH reserves one guess against its client
address (IPv6: the /64) and against its user name; after the verdict it settles:

* reject: the guess is counted. After `max_failures` in `window` seconds a key is
  locked for `base_backoff` seconds, doubling with each lock-out up to `max_backoff`
  (the level is remembered for max_backoff after a lock ends, so a slow guesser keeps
  climbing). While locked, AUTH is refused before any backend runs.
* reject by one backend while another failed temporarily (454 to the client): counted
  at a quarter, so 4 x max_failures of these lock (section 9 of issue 12). A backend
  that is down, or that an attacker slows on purpose, must not switch the limit off;
  the larger budget spares a user whose password lives on the backend that is down.
* temporary failure only: released, not counted (an outage is not an attack).
* accept: released; the user name's failures are forgotten (not the address's: one
  valid account must not reset the counter of an address guessing at others), and
  the address is remembered as known-good for that user for KNOWN_GOOD_DAYS.

Holds count like failures, so N AUTHs at once from one address reach the backends at
most max_failures times; the others wait a little for room, then get 454. A known-good
address is exempt from its user's lock (an attacker cannot lock a user out of the
places they log in from), never from its own address limit.

The counters live in a store (ofmipd/store.py): SQLite in the state directory (the
default; shared by every process on the host, `ofmipd -1` included), memory (one
daemon) or Redis (several hosts). If the store cannot be used, the limiter fails open
(to a limit in this process's memory) or closed (AUTH refused), as configured, and
says which in one log line at most once a minute.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from ofmipd.errors import ConfigError
from ofmipd.identity import address_group
from ofmipd.store import Grant, Ladder, Limit, MemoryStore, Store, StoreDown

if TYPE_CHECKING:
    from ofmipd.auth import Decision

log = logging.getLogger("ofmipd.ratelimit")

UNIT = 4  # what a rejected guess costs; one next to a temporary failure costs 1
KNOWN_GOOD_DAYS = 30
KNOWN_GOOD_SECONDS = KNOWN_GOOD_DAYS * 86400.0


class Policy(NamedTuple):
    max_failures: int = 5
    window: float = 600.0
    base_backoff: float = 60.0
    max_backoff: float = 3600.0

    def limit(self, key: str) -> Limit:
        ladder = Ladder(self.base_backoff, self.max_backoff, memory=self.max_backoff)
        return Limit(key, self.max_failures * UNIT, self.window, ladder)


class Refusal(NamedTuple):
    """Why an AUTH is refused without asking any backend."""

    reason: str  # for the admin's log line; fail2ban matches "too many failures from "
    retry_after: int  # seconds
    key: str  # "ip", "user", "busy" (only AUTHs in flight fill the budget), "store"


class Ticket(NamedTuple):
    """A reserved guess, to be settled with the chain's decision."""

    store: Store
    grant: Grant
    ip: str | None
    user: str | None
    known: str | None = None  # the known-good record of this address and name: its time


def ip_key(ip: str) -> str:
    """The key of a client address: IPv6 by /64, since one attacker holds a whole /64."""
    return "ip:" + address_group(ip)


def fold_user(user: str) -> str:
    """A user name as one counter sees it: NFKC and case-folded (ALICE, alice and
    full-width ａｌｉｃｅ are one), combining marks dropped after NFKD (ALİCE folds to
    "i" + U+0307, which joins alice; so does josé jose) and runs of white space as one
    space. Sharing a counter between look-alike names only makes locking stricter."""
    import unicodedata

    folded = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", user).casefold())
    bare = "".join(char for char in folded if not unicodedata.combining(char))
    return " ".join(unicodedata.normalize("NFKC", bare).split())


@functools.lru_cache(maxsize=4096)
def user_key(user: str) -> str:
    """The key of a user name: folded, then hashed, so any bytes make a safe key and the
    store does not hold a list of user names."""
    import hashlib

    digest = hashlib.sha256(fold_user(user).encode("utf-8", "surrogateescape")).hexdigest()
    return "user:" + digest[:32]


def known_key(user: str, ip: str) -> str:
    """The record saying that this address logged in as this user."""
    import hashlib

    digest = hashlib.sha256(f"{user_key(user)} {ip_key(ip)}".encode()).hexdigest()
    return "good:" + digest[:32]


def partial_reject(decision: Decision) -> bool:
    """A TEMPFAIL in which some backend rejected the password: a guess all the same."""
    from ofmipd.auth import Verdict

    return decision.verdict is Verdict.TEMPFAIL and any(
        a.outcome.verdict is Verdict.REJECT for a in decision.attempts
    )


class LoginLimiter:
    """The facade the SMTP layer calls around each AUTH: begin() before the chain,
    settle() after it (or abandon() if the session ends in between)."""

    def __init__(
        self,
        store: Store,
        max_failures: int = 5,
        window: float = 600.0,
        base_backoff: float = 60.0,
        max_backoff: float = 3600.0,
        fail_open: bool = True,
        failure_delay: float = 1.0,
        hold: float = 60.0,
        wait: float = 5.0,
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
        self.hold = hold  # longest a reservation lives: the chain's worst case, and more
        self.wait = wait  # longest an AUTH waits for room while others are in flight
        self.log_interval = log_interval
        self.clock = clock
        self._fallback: MemoryStore | None = None
        self._down_since: float | None = None
        self._last_down_log = -math.inf
        self._abandoned: set[asyncio.Task[Any]] = set()
        self._lines: dict[str, collections.deque[asyncio.Event]] = {}  # see _begin

    def describe(self) -> str:
        policy = self.policy
        return (
            f"{self.store.describe()}: {policy.max_failures} failures in {policy.window:g}s"
            f" ({policy.max_failures * UNIT} next to a backend's temporary failure) per address"
            f" or user name, lock for {policy.base_backoff:g}s doubling to "
            f"{policy.max_backoff:g}s, {self.delay:g}s delay per failure, fail "
            + ("open (to a limit in process memory)" if self.fail_open else "closed")
        )

    # ---- around one AUTH --------------------------------------------------------------

    async def begin(self, ip: str | None, user: str | None) -> Ticket | Refusal:
        """Reserve one guess for this address and user name, or say why not."""
        try:
            result = await self._begin(self.store, ip, user)
        except StoreDown as error:
            self._store_down(error)
            if not self.fail_open:
                return Refusal("rate limiter store unavailable, failing closed", 60, "store")
            return await self._begin(self._memory(), ip, user)
        self._store_up()
        return result

    async def settle(self, ticket: Ticket, decision: Decision) -> Refusal | None:
        """Count (or release) the reserved guess. Returns the lock-out it started, if any."""
        charge, keys = self._charge(ticket, decision)
        try:
            started = await self._settle(ticket.store, ticket, decision, charge, keys)
        except StoreDown as error:
            self._store_down(error)
            if not self.fail_open:
                return None
            started = await self._settle(self._memory(), ticket, decision, charge, keys)
        else:
            if ticket.store is self.store:
                self._store_up()
        self._wake(ticket.ip)
        lockout: Refusal | None = None
        for limit, seconds in zip(ticket.grant.limits, started, strict=True):
            if seconds > 0 and (lockout is None or seconds > lockout.retry_after):
                kind = "ip" if limit.key.startswith("ip:") else "user"
                lockout = self._refusal(kind, ticket.ip, seconds)
        return lockout

    def abandon(self, ticket: Ticket) -> None:
        """The session ended before a verdict: give the reservation back, in the background."""

        async def release() -> None:
            try:
                await ticket.store.settle(ticket.grant, 0)
            except StoreDown:
                pass  # the hold expires by itself
            self._wake(ticket.ip)

        task = asyncio.get_running_loop().create_task(release())
        self._abandoned.add(task)
        task.add_done_callback(self._abandoned.discard)

    async def drain(self) -> None:
        """Wait for the reservations given back in the background: a process that ends
        first (every `ofmipd -1` session) would leave them held in the shared store until
        they expire, and a few cancelled SCRAM exchanges would lock the name out."""
        while self._abandoned:
            await asyncio.gather(*self._abandoned, return_exceptions=True)

    async def failure_delay(self) -> None:
        """Slow each rejected or refused attempt down (the session waits, not the loop)."""
        if self.delay > 0:
            await asyncio.sleep(self.delay)

    async def close(self) -> None:
        await self.store.close()

    # ---- helpers -------------------------------------------------------------------------

    async def _begin(self, store: Store, ip: str | None, user: str | None) -> Ticket | Refusal:
        limits = []
        if ip:
            limits.append(self.policy.limit(ip_key(ip)))
        known = await store.get(known_key(user, ip)) if user and ip else None
        if user and known is None:
            limits.append(self.policy.limit(user_key(user)))
        # AUTHs from one address that find no room wait in line, in order of arrival: a
        # waiter that only polled would lose each freed slot to newcomers, and under a
        # busy NAT's steady load time out while room came up all the time. Only the head
        # of the line asks the store; it is woken when a slot here is freed, and polls for
        # slots other processes free.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        line_key = ip_key(ip) if ip else ""
        line = self._lines.setdefault(line_key, collections.deque())
        turn = asyncio.Event()
        line.append(turn)
        pause = 0.05
        try:
            while True:
                turn.clear()  # before asking: a slot freed meanwhile sets it again
                if line[0] is turn:
                    result = await store.reserve(limits, UNIT, self.hold)
                    if isinstance(result, Grant):
                        return Ticket(store, result, ip, user, known)
                    kind = "ip" if result.key.startswith("ip:") else "user"
                    if result.locked:
                        return self._refusal(kind, ip, result.seconds)
                    if loop.time() + pause > deadline:
                        return self._busy(kind, ip, result.seconds)
                    timeout, pause = pause, min(pause * 2, 0.5)
                else:
                    timeout = deadline - loop.time()
                    if timeout <= 0:
                        return self._busy("ip", ip, 1.0)
                try:
                    await asyncio.wait_for(turn.wait(), timeout)
                except TimeoutError:
                    pass
        finally:
            head = line[0] is turn
            line.remove(turn)
            if not line:
                del self._lines[line_key]
            elif head:
                line[0].set()  # the next in line asks at once: there may be room for it too

    def _wake(self, ip: str | None) -> None:
        """A slot of this address was freed here: the head of its line may have it."""
        line = self._lines.get(ip_key(ip) if ip else "")
        if line:
            line[0].set()

    def _charge(self, ticket: Ticket, decision: Decision) -> tuple[int, list[str] | None]:
        from ofmipd.auth import Verdict

        if decision.verdict is Verdict.REJECT:
            attempts = decision.attempts
            if attempts and attempts[0].backend == "door":  # malformed: no user to blame
                return UNIT, [lim.key for lim in ticket.grant.limits if lim.key.startswith("ip:")]
            return UNIT, None
        if partial_reject(decision):
            return 1, None
        return 0, None

    async def _settle(
        self,
        store: Store,
        ticket: Ticket,
        decision: Decision,
        charge: int,
        keys: list[str] | None,
    ) -> list[float]:
        from ofmipd.auth import Verdict

        started = await store.settle(ticket.grant, charge, keys)
        if decision.verdict is not Verdict.ACCEPT or not ticket.user:
            return started
        typed = user_key(ticket.user)
        canonical = user_key(decision.user) if decision.user else typed
        if ticket.known is None:
            # The owner has shown up (from a new place): forget the name's failures. Not
            # after a login from a known address, which is exempt from them: that would
            # give whoever is guessing from elsewhere a fresh budget with each of hers.
            reserved = [limit.key for limit in ticket.grant.limits]
            counted = dict(zip(reserved, ticket.grant.used, strict=False))  # unknown: forgive
            await store.forgive([key for key in {typed, canonical} if counted.get(key, 1) > 0])
        if ticket.ip:
            # Remember the address under the name typed and the canonical one (a login by
            # alias counts); refreshed at most daily, so most logins write nothing here.
            now = int(time.time())
            names = [ticket.user] if ticket.known is None or _stale(ticket.known, now) else []
            if canonical != typed:
                names.append(decision.user or "")
            for name in names:
                await store.put(known_key(name, ticket.ip), str(now), KNOWN_GOOD_SECONDS)
        return started

    def _memory(self) -> MemoryStore:
        if self._fallback is None:
            self._fallback = MemoryStore()
        return self._fallback

    @staticmethod
    def _refusal(kind: str, ip: str | None, seconds: float) -> Refusal:
        retry = max(1, math.ceil(seconds))
        if kind == "ip":
            # fail2ban's filter bans on this wording only: a locked user name must not get
            # its owner's address banned because someone else guessed at it.
            return Refusal(f"too many failures from {ip}, retry in {retry}s", retry, "ip")
        return Refusal(f"too many failures for this user name, retry in {retry}s", retry, "user")

    @staticmethod
    def _busy(kind: str, ip: str | None, seconds: float) -> Refusal:
        # Not a failure, and not worded as one: fail2ban must not ban a busy NAT.
        where = f"address {ip}" if kind == "ip" else "user name"
        retry = max(1, math.ceil(seconds))
        return Refusal(f"too many logins in progress for this {where}", retry, "busy")

    def _store_down(self, error: StoreDown) -> None:
        now = self.clock()
        if self._down_since is None:
            self._down_since = now
        if now - self._last_down_log >= self.log_interval:
            from ofmipd.logs import printable

            self._last_down_log = now
            log.error(
                "ratelimit: %s store unavailable (%s); failing %s",
                self.store.name,
                printable(error, limit=512),
                "open: logins are limited in this process's memory only"
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


def _stale(recorded: str, now: int) -> bool:
    try:
        return now - int(recorded) > 86400
    except ValueError:
        return True


_NUMBERS = ("max_failures", "window", "base_backoff", "max_backoff", "failure_delay")
DEFAULT_STORE = "sqlite"


def parse_ratelimit(
    spec: str | None,
    options: Mapping[str, Any] | None = None,
    *,
    state_dir: str | None = None,
    username: str | None = None,
    hold: float = 60.0,
) -> LoginLimiter | None:
    """--ratelimit SPEC / TOML [ratelimit] store = SPEC plus options -> a LoginLimiter.

    SPEC is "sqlite" (the default: a file in the state directory), "memory",
    "redis://host:port/db" (also rediss://, unix://) or "off".
    Options: max_failures, window, base_backoff, max_backoff, failure_delay (seconds),
    fail_open (bool), max_entries (memory), timeout and key_prefix (redis).
    """
    options = dict(options or {})
    spec = options.pop("store", None) if spec is None else spec
    options.pop("store", None)
    spec = (spec or DEFAULT_STORE).strip()
    if spec.lower() in ("off", "none"):
        return None
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
    if spec.lower() != "memory" and "max_entries" in options:
        raise ConfigError("ratelimit: max_entries applies to the memory store only")
    store = open_store(spec, options, state_dir=state_dir, username=username)
    return LoginLimiter(store, hold=hold, **limits)


def open_store(
    spec: str,
    options: Mapping[str, Any] | None = None,
    *,
    state_dir: str | None = None,
    username: str | None = None,
) -> Store:
    """The store a --ratelimit SPEC names ("off": the default, sqlite). The guessing
    limits and the quotas (ofmipd/quota.py) both count in it."""
    options = dict(options or {})
    spec = (spec or DEFAULT_STORE).strip()
    if spec.lower() in ("off", "none"):
        spec = DEFAULT_STORE
    kind = spec.lower()
    redis = kind.startswith(("redis://", "rediss://", "unix://"))
    if not redis and ("timeout" in options or "key_prefix" in options):
        raise ConfigError("ratelimit: timeout and key_prefix apply to redis:// stores only")
    store: Store
    if kind == "memory":
        max_entries = _number("max_entries", options.get("max_entries", 100_000), integer=True)
        store = MemoryStore(max_entries=int(max_entries))
    elif kind == "sqlite":
        from ofmipd import statedir
        from ofmipd.store_sqlite import SQLiteStore

        store = SQLiteStore(statedir.resolve(state_dir), username)
    elif redis:
        from ofmipd.store_redis import RedisStore

        timeout = _number("timeout", options.get("timeout", 0.5))
        prefix = options.get("key_prefix", "ofmipd:rl:")
        if not isinstance(prefix, str):
            raise ConfigError("ratelimit: key_prefix must be a string")
        store = RedisStore(spec, timeout=timeout, key_prefix=prefix)
    else:
        from ofmipd.logs import redact_url

        raise ConfigError(
            f"ratelimit: unknown store {redact_url(spec)!r} "
            "(use sqlite, memory, redis://HOST:PORT/DB or off)"
        )
    return store


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
