"""A bounded thread pool per blocking backend (PAM, LDAP, password hashing).

Where work runs is a property of the backend, not of its code: the backend calls
`await offload.run(fn, *args)` and its blocking function runs in a worker thread.
A worker stuck in a hung library call keeps its slot until the call returns, so a
hang shows up as queue age, which turns into a TimeoutError the chain reports as
a temporary failure instead of an ever-growing backlog.
"""

from __future__ import annotations

import asyncio
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
        self._free = threading.BoundedSemaphore(workers)
        self._waiting = 0
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
        deadline = time.monotonic() + self.max_queue_age
        self._waiting += 1
        try:
            while not self._free.acquire(blocking=False):
                self._note_backlog()
                if time.monotonic() >= deadline:
                    raise QueueTimeout(
                        f"{self.name}: all {self.workers} workers busy for {self.max_queue_age:g}s"
                    )
                await asyncio.sleep(0.01)
        finally:
            self._waiting -= 1
        future = self._executor().submit(fn, *args)
        # The slot is freed when the thread finishes, not when the caller gives up.
        future.add_done_callback(lambda _: self._free.release())
        return await asyncio.wrap_future(future, loop=loop)

    def _note_backlog(self) -> None:
        now = time.monotonic()
        if now - self._warned_at > 10:
            self._warned_at = now
            log.warning(
                "%s: %d requests waiting for %d busy workers",
                self.name,
                self._waiting,
                self.workers,
            )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
