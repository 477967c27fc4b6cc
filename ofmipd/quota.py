"""Built-in sending quotas: messages and recipients per login or client address per window.

A message is checked at MAIL (one unit against each message quota), each recipient at
RCPT (one unit against each recipient quota). A check is a reservation in the shared
store (ofmipd/store.py): N sessions of one login at once can never all pass a budget
of fewer than N. The transaction's holds are settled when it ends: charged if the
delivery target answered 250, released otherwise (RSET, QUIT, a 4xx/5xx after DATA,
the client gone). A refused or failed message uses no quota; a message with three
accepted recipients charges three.

"user" quotas count the authenticated login as the guessing limits key it (folded:
ALICE and alice share a budget); "ip" quotas count the client address (IPv6: the /64).
A relay client that did not log in is counted by address only.

The store is the guessing limits' one; if it cannot be used, quotas fail open (to
counters in this process's memory) or closed (451), as --ratelimit-fail-closed says.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from typing import Any, NamedTuple

from ofmipd.errors import ConfigError
from ofmipd.store import Blocked, Grant, Limit, MemoryStore, Store, StoreDown

log = logging.getLogger("ofmipd.quota")

KINDS = ("user-messages", "user-recipients", "ip-messages", "ip-recipients")
_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
_WINDOW = re.compile(r"([0-9]+)([smhd]?)")
REPLY_STORE_DOWN = "451 4.3.0 Sending limits cannot be checked now, try again later"


class Quota(NamedTuple):
    kind: str  # one of KINDS
    limit: int  # units per window
    window: float  # seconds; a window opens with the first charge

    def __str__(self) -> str:
        return f"{self.kind}:{self.limit}/{window_text(self.window)}"

    @property
    def who(self) -> str:
        return self.kind.partition("-")[0]  # "user" or "ip"

    @property
    def counts(self) -> str:
        return self.kind.partition("-")[2]  # "messages" or "recipients"

    def key(self, subject: str) -> str:
        """The store key of this quota for one subject (ratelimit.user_key / ip_key)."""
        return f"quota:{self.kind}/{self.window:g}:{subject}"


def window_text(seconds: float) -> str:
    for unit, size in _UNITS:
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def parse_window(text: str, where: str) -> float:
    match = _WINDOW.fullmatch(text.strip())
    if match is None or int(match.group(1)) < 1:
        raise ConfigError(f"{where}: window {text!r}: expected a number and s, m, h or d (1h)")
    return float(int(match.group(1)) * dict(_UNITS)[match.group(2) or "s"])


def parse_quota(text: str) -> Quota:
    """--quota KIND:LIMIT/WINDOW, e.g. user-messages:200/1h."""
    where = f"--quota {text!r}"
    kind, colon, rest = text.strip().partition(":")
    limit, slash, window = rest.partition("/")
    if not (colon and slash):
        raise ConfigError(f"{where}: expected KIND:LIMIT/WINDOW, e.g. user-messages:200/1h")
    return _quota(kind, limit, window, where)


def quota_from_table(table: Any) -> Quota:
    """A TOML [[quota]] table: kind = "...", limit = N, window = "1h" (or seconds)."""
    if not isinstance(table, dict):
        raise ConfigError("[[quota]]: each entry must be a table (kind, limit, window)")
    unknown = sorted(set(table) - {"kind", "limit", "window"})
    if unknown:
        raise ConfigError(f"[[quota]]: unknown setting {unknown[0]!r}")
    missing = [key for key in ("kind", "limit", "window") if key not in table]
    if missing:
        raise ConfigError(f"[[quota]]: {missing[0]} is required (kind, limit, window)")
    return _quota(table["kind"], table["limit"], table["window"], "[[quota]]")


def _quota(kind: Any, limit: Any, window: Any, where: str) -> Quota:
    if kind not in KINDS:
        raise ConfigError(f"{where}: kind {kind!r}: must be one of {', '.join(KINDS)}")
    if isinstance(limit, str) and limit.strip().isascii() and limit.strip().isdigit():
        limit = int(limit)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"{where}: limit {limit!r}: must be a positive integer")
    if isinstance(window, int) and not isinstance(window, bool):
        window = str(window)
    if not isinstance(window, str):
        raise ConfigError(f"{where}: window {window!r}: expected e.g. 30s, 10m, 1h or 1d")
    return Quota(kind, limit, parse_window(window, where))


class Refusal(NamedTuple):
    reply: str
    kind: str  # the quota kind, for the metric; "store" when the store failed closed


class Holds:
    """One transaction's reservations, charged or released together when it ends."""

    __slots__ = ("grants", "accepted")

    def __init__(self) -> None:
        self.grants: list[tuple[Store, Grant, str]] = []  # and what it counts
        self.accepted = False  # the delivery target said 250


class Usage(NamedTuple):
    quota: Quota
    used: int
    resets_in: float | None  # seconds; None when no window is open


class Quotas:
    """The quotas of one configuration, and the store their counters live in."""

    def __init__(
        self,
        quotas: tuple[Quota, ...],
        store: Store,
        *,
        permanent: bool = False,
        fail_open: bool = True,
        hold: float = 1800.0,
        log_interval: float = 60.0,
    ) -> None:
        self.quotas = quotas
        self.store = store
        self.permanent = permanent
        self.fail_open = fail_open
        self.hold = hold  # longest a transaction's reservation lives if nobody settles it
        self.log_interval = log_interval
        self._fallback: MemoryStore | None = None
        self._last_down_log = -math.inf
        self._pending: set[asyncio.Task[None]] = set()

    def describe(self) -> list[str]:
        reply = "permanent (550 5.7.1)" if self.permanent else "temporary (450 / 452)"
        failing = "open (to counters in process memory)" if self.fail_open else "closed (451)"
        lines = [f"quotas: {self.store.describe()}, over quota {reply}, fail {failing}"]
        lines += [f"  {quota}" for quota in self.quotas]
        return lines

    # ---- one transaction --------------------------------------------------------------

    async def check(
        self, holds: Holds, counts: str, user: str | None, ip: str | None, session_id: str
    ) -> Refusal | None:
        """Reserve one message (at MAIL) or recipient (at RCPT), or refuse it."""
        from ofmipd.ratelimit import ip_key, user_key

        keys: dict[str, Quota] = {}
        for quota in self.quotas:
            if quota.counts == counts:
                if quota.who == "user" and user:
                    keys[quota.key(user_key(user))] = quota
                elif quota.who == "ip" and ip:
                    keys[quota.key(ip_key(ip))] = quota
        if not keys:
            return None
        limits = [Limit(key, quota.limit, quota.window) for key, quota in keys.items()]
        if self._pending:  # settle first what ended before (RSET, then MAIL again at once)
            await asyncio.wait(set(self._pending))
        store = self.store
        try:
            result = await store.reserve(limits, 1, self.hold)
        except StoreDown as error:
            self._store_down(error)
            if not self.fail_open:
                return Refusal(REPLY_STORE_DOWN, "store")
            store = self._memory()
            result = await store.reserve(limits, 1, self.hold)
        if isinstance(result, Grant):
            holds.grants.append((store, result, counts))
            return None
        quota = keys[result.key]
        self._log_refusal(quota, result, user, ip, session_id)
        return Refusal(self._reply(quota, result), quota.kind)

    def release_last(self, holds: Holds) -> None:
        """The last recipient was refused downstream: give its reservation back (if it
        made one: the last may be the message's, when no recipient quota applies)."""
        if holds.grants and holds.grants[-1][2] == "recipients":
            self._later(self._settle([holds.grants.pop()], 0))

    def end(self, holds: Holds) -> None:
        """The transaction ended: charge its holds if the message was accepted, else
        release them. In the background; drain() waits for it before a process exits."""
        if holds.grants:
            grants, holds.grants = holds.grants, []
            self._later(self._settle(grants, 1 if holds.accepted else 0))

    async def drain(self) -> None:
        while self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    # ---- ofmipd-authtest --quota ----------------------------------------------------------

    async def usage(self, user: str) -> list[Usage]:
        """Each user quota's units charged in its current window, and when it resets.

        The store has no read-only call: a reservation of 0 units tells what is charged,
        and one of more than the rest of the budget is refused with the window's end."""
        from ofmipd.ratelimit import user_key

        found = []
        for quota in self.quotas:
            if quota.who != "user":
                continue
            limit = Limit(quota.key(user_key(user)), quota.limit, quota.window)
            probe = await self.store.reserve([limit], 0, 1.0)
            used = 0
            if isinstance(probe, Grant):
                used = probe.used[0] if probe.used else 0
                await self.store.settle(probe, 0)
            over = await self.store.reserve([limit], quota.limit - used + 1, 1.0)
            resets_in = over.seconds if isinstance(over, Blocked) and used else None
            if isinstance(over, Grant):  # not expected: give it back
                await self.store.settle(over, 0)
            found.append(Usage(quota, used, resets_in))
        return found

    # ---- helpers -----------------------------------------------------------------------

    def _reply(self, quota: Quota, blocked: Blocked) -> str:
        what = "Message" if quota.counts == "messages" else "Recipient"
        if self.permanent:  # a hard stop, also when holds in flight fill the budget
            return f"550 5.7.1 {what} quota exceeded ({quota})"
        if quota.counts == "messages":
            return f"450 4.7.1 {what} quota exceeded ({quota}), try again later"
        return f"452 4.5.3 {what} quota exceeded ({quota}), try again later"

    def _log_refusal(
        self, quota: Quota, blocked: Blocked, user: str | None, ip: str | None, session_id: str
    ) -> None:
        from ofmipd.logs import printable

        if blocked.locked:  # the budget is spent: it has room again when the window ends
            at = time.gmtime(time.time() + max(0.0, blocked.seconds))
            reset = "resets=" + time.strftime("%Y-%m-%dT%H:%M:%SZ", at)
        else:  # messages still in progress fill it: room again if one of them fails
            reset = "resets=- in_progress=yes"
        log.warning(
            "session %s: over quota %s user=%s client=%s %s",
            printable(session_id),
            printable(quota),
            printable(user or "-"),
            printable(ip or "unknown"),
            reset,
        )

    async def _settle(self, grants: list[tuple[Store, Grant, str]], charge: int) -> None:
        for store, grant, _ in grants:
            try:
                await store.settle(grant, grant.units * charge)
            except StoreDown as error:  # a hold expires by itself; a charge is lost
                self._store_down(error)

    def _later(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def _memory(self) -> MemoryStore:
        if self._fallback is None:
            self._fallback = MemoryStore()
        return self._fallback

    def _store_down(self, error: StoreDown) -> None:
        now = time.monotonic()
        if now - self._last_down_log >= self.log_interval:
            from ofmipd.logs import printable

            self._last_down_log = now
            log.error(
                "quota: %s store unavailable (%s); failing %s",
                self.store.name,
                printable(error, limit=512),
                "open: quotas are counted in this process's memory only"
                if self.fail_open
                else "closed: MAIL and RCPT get 451",
            )
