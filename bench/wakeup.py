"""Where the AUTH round trip's extra milliseconds go: `python -m bench.wakeup`.

The chain-overhead target compares the AUTH round trip with the backend's raw cost.
Part of the difference is not ofmipd's code but the machine: an event loop that
waits for a thread or a child process sleeps in epoll_wait, and waking it costs
more after a few idle milliseconds than after none (on a VM, the idle vCPU has
to be woken too). This prints, side by side in one run (medians of N):

- a no-op handed to a thread and back (the hop itself),
- time.sleep(2.4 ms) in a thread minus the same sleep inline (the wake-up after idle),
- bcrypt cost 5 in a thread minus inline (what the htpasswd backend pays),
- ofmipd's run_program(/bin/true) minus posix_spawn + waitpid (what checkpassword pays).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable

import bcrypt

from bench.extras import median_seconds
from ofmipd.proc import run_program


def _ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


async def _timed(fn: Callable[[], Awaitable[object]], n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - start)
    return _ms(times)


def _timed_sync(fn: Callable[[], object], n: int) -> float:
    return median_seconds(fn, n) * 1000


def _spawn_and_wait() -> None:
    os.waitpid(os.posix_spawn("/bin/true", ["/bin/true"], os.environ), 0)


async def measure(n: int) -> list[tuple[str, float, float]]:
    hashed = bcrypt.hashpw(b"secret", bcrypt.gensalt(5))

    def check() -> bool:
        return bcrypt.checkpw(b"secret", hashed)

    def nap() -> None:
        time.sleep(0.0024)

    return [
        ("no-op in a thread", await _timed(lambda: asyncio.to_thread(lambda: None), n), 0.0),
        ("sleep 2.4 ms: thread vs inline", await _timed(lambda: asyncio.to_thread(nap), n),
         _timed_sync(nap, n)),
        ("bcrypt cost 5: thread vs inline", await _timed(lambda: asyncio.to_thread(check), n),
         _timed_sync(check, n)),
        ("/bin/true: run_program vs posix_spawn+waitpid",
         await _timed(lambda: run_program(["/bin/true"], timeout=10,
                                          pass_fds_data={3: b"u\0p\0\0"}), n),
         _timed_sync(_spawn_and_wait, n)),
    ]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wakeup", description=__doc__)
    parser.add_argument("-n", type=int, default=200, help="repetitions per figure")
    args = parser.parse_args()
    print("| what | through the loop ms | inline ms | difference ms |")
    print("|---|---|---|---|")
    for name, looped, inline in asyncio.run(measure(args.n)):
        print(f"| {name} | {looped:.3f} | {inline:.3f} | {looped - inline:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
