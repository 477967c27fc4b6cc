"""The daemon waits for events, not by polling: a stop drains as soon as the last session
ends, and an accept failure is retried when a session ends (or after 0.1 s)."""

from __future__ import annotations

import asyncio
import socket
import time
import types
from typing import Any

import pytest

from ofmipd import listeners
from ofmipd.listeners import Daemon


@pytest.fixture(autouse=True)
def no_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    async def sleep(*_args: object) -> None:
        raise AssertionError("the daemon polled with asyncio.sleep")

    monkeypatch.setattr(listeners.asyncio, "sleep", sleep)


def daemon() -> Daemon:
    app: Any = types.SimpleNamespace(config=types.SimpleNamespace(connections=4))
    return Daemon(app, [], lambda: app.config)


def test_drain_returns_when_the_last_session_ends() -> None:
    async def main() -> float:
        d = daemon()
        one, two = object(), object()
        d.sessions.update((one, two))  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        loop.call_later(0.02, d.ended, one)
        loop.call_later(0.05, d.ended, two)
        began = time.monotonic()
        await d.drain(grace=10)
        assert not d.sessions
        return time.monotonic() - began

    took = asyncio.run(main())
    assert 0.04 <= took < 5


def test_drain_gives_up_after_the_grace_period() -> None:
    async def main() -> float:
        d = daemon()
        d.sessions.add(object())  # type: ignore[arg-type]
        began = time.monotonic()
        await d.drain(grace=0.1)
        assert len(d.sessions) == 1
        return time.monotonic() - began

    assert 0.09 <= asyncio.run(main()) < 5


def test_a_failed_accept_is_retried_when_a_session_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listeners, "ACCEPT_RETRY_SECONDS", 60.0)  # only an event can wake it

    async def main() -> int:
        d = daemon()
        attempts = 0
        retried = asyncio.Event()
        loop = asyncio.get_running_loop()

        async def failing_accept(sock: socket.socket) -> Any:
            nonlocal attempts
            attempts += 1
            if attempts == 1:
                loop.call_later(0.01, d.ended, object())
            else:
                retried.set()
            raise OSError(24, "Too many open files")

        loop.sock_accept = failing_accept  # type: ignore[method-assign]
        with socket.socket() as listener:
            task = asyncio.create_task(d.accept_loop(listener))
            try:
                await asyncio.wait_for(retried.wait(), 10)
            finally:
                task.cancel()
        return attempts

    assert asyncio.run(main()) == 2
