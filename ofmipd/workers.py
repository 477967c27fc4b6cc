"""--workers N: N processes serve the same listening sockets, one event loop each.

The parent binds (and drops privileges) once, then forks; the kernel hands each
new connection to whichever worker accepts it first, so a multi-core host is
used fully. The parent only supervises: it forwards SIGTERM and SIGHUP, and
replaces a worker that dies unexpectedly.

State that must be shared between workers lives outside them: the guessing
limits' default SQLite store in the state directory (or Redis), which each worker
opens for itself after the fork. -C and --max-per-ip apply per worker. Each worker reloads its own
configuration on SIGHUP, so all of them switch to the new one.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable

log = logging.getLogger("ofmipd")

# The signals the daemon and its workers act on. One that arrives between binding the
# sockets (clients can connect from then on) and installing the handlers waits, blocked,
# instead of killing the process.
HELD_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1}


def run_workers(count: int, serve: Callable[[], None]) -> int:
    """Fork `count` workers that each run serve(); return when all have stopped."""
    children: dict[int, float] = {}  # pid -> start time
    stopping = False

    def spawn() -> None:
        # The worker starts with these blocked; its Daemon unblocks them once it can act.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
        pid = os.fork()
        if pid == 0:
            for sig in HELD_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            try:
                serve()
            finally:
                os._exit(0)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        children[pid] = time.monotonic()

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM if sig == signal.SIGINT else sig)
            except ProcessLookupError:
                pass

    for sig in HELD_SIGNALS:
        signal.signal(sig, forward)
    for _ in range(count):
        spawn()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)  # serve_daemon blocked them
    log.info("started %d workers", count)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        started = children.pop(pid, None)
        if started is None or stopping:
            continue
        log.error("worker %d ended (status %d); starting another", pid, status)
        if time.monotonic() - started < 1:
            time.sleep(1)  # a worker that dies at once must not spin the parent
        spawn()
    return 0
