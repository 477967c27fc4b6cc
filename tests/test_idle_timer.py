"""The session's one timer (ofmipd/idle_timer.py), on a fake clock: one handle per
session however many commands push the deadline back, and the greeting deadline caps
everything before EHLO."""

from __future__ import annotations

from collections.abc import Callable

from ofmipd.idle_timer import IdleTimer


class Handle:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """time() and call_at() only; run_until(t) fires what is due, in order."""

    def __init__(self) -> None:
        self.now = 0.0
        self.handles: list[Handle] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> Handle:
        handle = Handle(when, callback)
        self.handles.append(handle)
        return handle

    def run_until(self, until: float) -> None:
        while due := [h for h in self.handles if not h.cancelled and h.when <= until]:
            handle = min(due, key=lambda h: h.when)
            self.handles.remove(handle)
            self.now = handle.when
            handle.callback()
        self.now = until


def make(idle: float = 10.0, greeting: float = 3.0) -> tuple[FakeLoop, IdleTimer, list[float]]:
    loop = FakeLoop()
    fired: list[float] = []
    timer = IdleTimer(loop, idle, greeting, lambda: fired.append(loop.now))  # type: ignore[arg-type]
    return loop, timer, fired


def test_commands_push_the_deadline_back_without_a_new_handle_each():
    loop, timer, fired = make()
    timer.greeted()
    for second in range(1, 8):
        loop.run_until(second)
        timer.reset()  # a command
    assert len(loop.handles) == 1  # one handle armed at the first deadline, never replaced
    loop.run_until(16.9)
    assert fired == []  # it fired at 10, saw the deadline moved to 17, and re-armed
    loop.run_until(20)
    assert fired == [17.0]


def test_the_greeting_deadline_caps_commands_before_ehlo():
    loop, timer, fired = make(idle=10.0, greeting=3.0)
    timer.reset()
    loop.run_until(2)
    timer.reset()  # NOOP before EHLO does not buy another 10 s
    assert timer.greeting_time_left() == 1.0
    loop.run_until(5)
    assert fired == [3.0]


def test_ehlo_switches_to_the_idle_timeout():
    loop, timer, fired = make(idle=10.0, greeting=3.0)
    timer.reset()
    loop.run_until(2)
    timer.greeted()
    assert timer.greeting_time_left() == 10.0  # no greeting deadline left: the idle one
    loop.run_until(11.9)
    assert fired == []
    loop.run_until(13)
    assert fired == [12.0]


def test_a_shorter_duration_rearms_at_once_and_cancel_stops_it():
    loop, timer, fired = make()
    timer.greeted()
    timer.reset(2.0)  # earlier than the armed deadline: a new handle, the old one cancelled
    assert [h.cancelled for h in loop.handles] == [True, False]
    timer.cancel()
    loop.run_until(30)
    assert fired == []
