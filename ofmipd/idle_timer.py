"""One session's timer: the greeting deadline, then the idle and DATA timeouts.

aiosmtpd cancels and creates a TimerHandle on every command (docs/aiosmtpd-upstream.md,
6). This keeps one handle per session and re-arms it when it fires before the
deadline, which most commands only push back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class IdleTimer:
    __slots__ = (
        "_loop",
        "_idle",
        "_on_timeout",
        "_deadline",
        "_due",
        "handle",
        "greeting_deadline",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        idle: float,
        greeting: float,
        on_timeout: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._idle = idle
        self._on_timeout = on_timeout
        self._deadline = 0.0
        self._due: float | None = None  # when the armed handle fires; None if none is armed
        self.handle: asyncio.TimerHandle | None = None
        # Until EHLO/HELO: one deadline from the start, for the PROXY header, the implicit
        # TLS handshake and the greeting, so an idle socket cannot hold a slot for long.
        self.greeting_deadline: float | None = loop.time() + greeting

    def reset(self, duration: float | None = None) -> None:
        """Push the deadline back to `duration` (default: the idle timeout) from now.
        Before EHLO/HELO, commands (NOOP, RSET) never push it past the greeting deadline."""
        self._deadline = self._loop.time() + (duration or self._idle)
        if self.greeting_deadline is not None:
            self._deadline = min(self._deadline, self.greeting_deadline)
        if self._due is None or self._due > self._deadline:
            self.cancel()
            self._arm()

    def greeted(self) -> None:
        """EHLO or HELO: from now on the idle timeout applies."""
        if self.greeting_deadline is not None:
            self.greeting_deadline = None
            self.reset()

    def greeting_time_left(self) -> float:
        if self.greeting_deadline is None:
            return self._idle
        return max(self.greeting_deadline - self._loop.time(), 0.0)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self._due = None

    def _arm(self) -> None:
        self._due = self._deadline
        self.handle = self._loop.call_at(self._deadline, self._fired)

    def _fired(self) -> None:
        self._due = None
        if self._loop.time() < self._deadline:
            self._arm()
        else:
            self._on_timeout()
