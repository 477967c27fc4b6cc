"""A bounded thread pool per blocking backend (PAM, LDAP, password hashing).

Where work runs is a property of the backend, not of its code: the backend calls
`await offload.run(fn, *args)` and its blocking function runs in a worker thread.
A worker stuck in a hung library call keeps its slot until the call returns, so a
hang shows up as queue age, which turns into a QueueTimeout the chain reports as
a temporary failure (naming the queue) instead of an ever-growing backlog.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("ofmipd.offload")


class QueueTimeout(TimeoutError):
    """All workers stayed busy longer than the queue-age limit."""


class Offload:
    def __init__(self, name: str, workers: int = 4, max_queue_age: float = 10.0) -> None:
        self.name = name
        self.workers = workers
        self.max_queue_age = max_queue_age
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        # Slots are freed by worker threads, and one backend may serve more than one event
        # loop over its life (tests, a reload), so the bookkeeping is under a thread lock
        # and a waiter is woken on its own loop.
        self._lock = threading.Lock()
        self._free = workers
        self._waiters: collections.deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]
        self._waiters = collections.deque()
        self._warned_at = 0.0

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        # Created lazily: one-session mode may never need a thread.
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self.workers, thread_name_prefix=f"ofmipd-{self.name}"
            )
        return self._pool

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        waiter = self._take_or_queue(loop)
        if waiter is not None:
            await self._wait(loop, waiter)
        try:
            future = self._executor().submit(fn, *args)
        except BaseException:  # closed: the slot goes back
            self._release()
            raise
        # The slot is freed when the thread finishes, not when the caller gives up.
        future.add_done_callback(self._release)
        return await asyncio.wrap_future(future, loop=loop)

    def _take_or_queue(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None] | None:
        """Take a free slot (None), or join the queue (first come, first served)."""
        with self._lock:
            if self._free and not self._waiters:
                self._free -= 1
                return None
            waiter = loop.create_future()
            self._waiters.append((loop, waiter))
            waiting = len(self._waiters)
        self._note_backlog(waiting)
        return waiter

    async def _wait(self, loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[None]) -> None:
        try:
            async with asyncio.timeout(self.max_queue_age):
                await waiter
        except BaseException as error:  # timed out or cancelled: leave, and leak no slot
            self._give_up(loop, waiter)
            if isinstance(error, TimeoutError):
                raise QueueTimeout(
                    f"{self.name}: all {self.workers} workers busy for {self.max_queue_age:g}s"
                ) from None
            raise

    def _give_up(self, loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[None]) -> None:
        with self._lock:
            if (loop, waiter) in self._waiters:
                self._waiters.remove((loop, waiter))
                return
        # Already chosen: the slot was handed over (pass it on) or is on its way
        # (_hand_over sees the cancelled waiter and passes it on).
        if waiter.done() and not waiter.cancelled():
            self._release()

    def _release(self, _future: object = None) -> None:
        """A slot is free (in a worker thread, or on a loop): to the first waiter, if any."""
        with self._lock:
            while self._waiters:
                loop, waiter = self._waiters.popleft()
                try:
                    loop.call_soon_threadsafe(self._hand_over, waiter)
                    return
                except RuntimeError:  # that waiter's loop is closed
                    continue
            self._free += 1

    def _hand_over(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done():  # it gave up meanwhile
            self._release()
        else:
            waiter.set_result(None)

    def _note_backlog(self, waiting: int) -> None:
        now = time.monotonic()
        if now - self._warned_at > 10:
            self._warned_at = now
            log.warning(
                "%s: %d requests waiting for %d busy workers",
                self.name,
                waiting,
                self.workers,
            )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
