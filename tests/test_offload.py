"""The bounded offload: a waiter is woken by the slot it gets, never by a poll, leaves the
queue after the queue-age limit, and no way of giving up (timeout, cancellation) keeps a
worker's slot."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

import pytest

from ofmipd import offload
from ofmipd.offload import Offload, QueueTimeout


class Gate:
    """A blocking job that runs until opened, and says when it has started."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.opened = threading.Event()

    def __call__(self, value: str = "done") -> str:
        self.started.set()
        self.opened.wait(10)
        return value


async def started(gate: Gate) -> None:
    await asyncio.to_thread(gate.started.wait, 10)


def free_slots(pool: Offload) -> int:
    return pool._free


@pytest.fixture
def pool() -> Callable[..., Offload]:
    made: list[Offload] = []

    def make(workers: int = 1, max_queue_age: float = 5.0) -> Offload:
        made.append(Offload("test", workers=workers, max_queue_age=max_queue_age))
        return made[-1]

    yield make
    for each in made:
        each.close()


def test_a_waiter_sleeps_until_a_slot_is_handed_to_it(pool, monkeypatch) -> None:
    # No timer runs while waiting: a poll (asyncio.sleep in a loop) would fail here.
    async def no_polling(*_args: object) -> None:
        raise AssertionError("the offload polled")

    monkeypatch.setattr(offload.asyncio, "sleep", no_polling)
    workers = pool(workers=1)
    gate = Gate()

    async def main() -> tuple[str, str, float]:
        first = asyncio.create_task(workers.run(gate, "first"))
        await started(gate)
        second = asyncio.create_task(workers.run(str.upper, "second"))
        await asyncio.to_thread(time.sleep, 0.05)
        assert not second.done(), "ran although the only worker was busy"
        opened = time.monotonic()
        gate.opened.set()
        result = await second
        return await first, result, time.monotonic() - opened

    first, second, took = asyncio.run(main())
    assert (first, second) == ("first", "SECOND")
    assert took < 2.0
    assert free_slots(workers) == 1


def test_the_queue_age_limit_raises_queue_timeout_and_keeps_no_slot(pool) -> None:
    workers = pool(workers=1, max_queue_age=0.1)
    gate = Gate()

    async def main() -> str:
        first = asyncio.create_task(workers.run(gate))
        await started(gate)
        began = time.monotonic()
        with pytest.raises(QueueTimeout, match=r"^test: all 1 workers busy for 0.1s$"):
            await workers.run(str, "late")
        assert time.monotonic() - began >= 0.09
        gate.opened.set()
        await first
        return await workers.run(str.upper, "after")  # the slot came back

    assert asyncio.run(main()) == "AFTER"
    assert free_slots(workers) == 1 and not workers._waiters


def test_a_cancelled_waiter_leaves_the_queue(pool) -> None:
    workers = pool(workers=1)
    gate = Gate()

    async def main() -> None:
        first = asyncio.create_task(workers.run(gate))
        await started(gate)
        waiting = asyncio.create_task(workers.run(str, "never"))
        await asyncio.sleep(0)
        assert len(workers._waiters) == 1
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert not workers._waiters
        gate.opened.set()
        await first

    asyncio.run(main())
    assert free_slots(workers) == 1


@pytest.mark.parametrize("handed_over", [False, True], ids=["on-its-way", "handed-over"])
def test_a_waiter_cancelled_as_its_slot_arrives_passes_it_on(pool, handed_over: bool) -> None:
    workers = pool(workers=1)

    async def main() -> str:
        assert workers._take_or_queue(asyncio.get_running_loop()) is None  # the one slot
        unlucky = asyncio.create_task(workers.run(str, "unlucky"))
        patient = asyncio.create_task(workers.run(str.upper, "patient"))
        await asyncio.sleep(0)
        assert len(workers._waiters) == 2
        workers._release()  # as a worker thread does: the slot goes to `unlucky`...
        if handed_over:
            await asyncio.sleep(0)  # ...and reaches it, but it has not run yet
            assert len(workers._waiters) == 1  # only `patient` still waits
        unlucky.cancel()  # ...which gives up: the slot must go on to `patient`
        with pytest.raises(asyncio.CancelledError):
            await unlucky
        return await asyncio.wait_for(patient, 5)

    assert asyncio.run(main()) == "PATIENT"
    assert free_slots(workers) == 1


def test_first_come_first_served(pool) -> None:
    workers = pool(workers=1)
    gate = Gate()
    order: list[int] = []

    async def main() -> None:
        first = asyncio.create_task(workers.run(gate))
        await started(gate)
        queued = []
        for number in range(5):
            queued.append(asyncio.create_task(workers.run(order.append, number)))
            await asyncio.sleep(0)
        gate.opened.set()
        await asyncio.gather(first, *queued)

    asyncio.run(main())
    assert order == [0, 1, 2, 3, 4]


def test_a_backlog_is_logged_once(pool, caplog: pytest.LogCaptureFixture) -> None:
    workers = pool(workers=1)
    gate = Gate()

    async def main() -> None:
        first = asyncio.create_task(workers.run(gate))
        await started(gate)
        queued = [asyncio.create_task(workers.run(str, n)) for n in range(3)]
        await asyncio.sleep(0)
        gate.opened.set()
        await asyncio.gather(first, *queued)

    with caplog.at_level(logging.WARNING, logger="ofmipd.offload"):
        asyncio.run(main())
    warnings = [r.getMessage() for r in caplog.records if r.name == "ofmipd.offload"]
    assert warnings == ["test: 1 requests waiting for 1 busy workers"]


def test_one_offload_serves_one_loop_after_another(pool) -> None:
    # Backends outlive an event loop in tests and in ofmipd-authtest.
    workers = pool(workers=1)
    for word in ("one", "two"):
        assert asyncio.run(workers.run(str.upper, word)) == word.upper()
    assert free_slots(workers) == 1
