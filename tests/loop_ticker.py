"""Measure how long the event loop stalls while some work runs.

A backend that does its slow part (a PAM module's delay, an LDAP server that does not
answer, a program that reads slowly) on the loop itself would still give correct
answers and decent medians; only the loop's lateness shows it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def with_ticker(work: Awaitable[T]) -> tuple[T, float]:
    """Run `work` while a 10 ms ticker measures the longest stall of the event loop."""
    worst = 0.0
    done = False

    async def tick() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            worst = max(worst, now - last)
            last = now

    ticker = asyncio.create_task(tick())
    try:
        result = await work
    finally:
        done = True
        await ticker
    return result, worst
