"""Shared test helpers: free loopback ports (tests/ports.py) and client identities."""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ofmipd.identity import ClientIdentity  # noqa: E402
from tests.ports import free_port as free_port  # noqa: E402  (imported from here by tests)

# Fixtures that change machine-wide state (system users, /etc/pam.d services): a test
# using one is marked `root` and runs holding MACHINE_WIDE_LOCK, so no two such tests run
# at once, in xdist workers or in two runs of the suite (useradd and friends fail while
# another holds /etc/passwd). A lock, not xdist_group: pytest 9.2 broke --dist loadgroup
# (pytest-xdist issue 1386), which then silently spreads a group over the workers.
MACHINE_WIDE_FIXTURES = {"make_user", "make_service", "pam_user", "checkpw_user"}
MACHINE_WIDE_LOCK = "/tmp/ofmipd-tests-machine-wide.lock"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if set(getattr(item, "fixturenames", ())) & MACHINE_WIDE_FIXTURES:
            item.add_marker(pytest.mark.root)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    if not item.get_closest_marker("root"):
        return (yield)
    fd = os.open(MACHINE_WIDE_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # set-up, test and teardown, all under the lock
        return (yield)
    finally:
        os.close(fd)


@pytest.fixture
def client() -> ClientIdentity:
    return ClientIdentity(
        ip="127.0.0.1",
        port=40000,
        local_ip="127.0.0.1",
        local_port=8025,
        source="socket",
        peer_ip="127.0.0.1",
    )


@pytest.fixture(autouse=True)
def private_state_directory(tmp_path_factory: pytest.TempPathFactory, monkeypatch: Any) -> None:
    """Guessing limits are on by default, in $STATE_DIRECTORY: each test gets its own, so
    an App built in the test process never shares lock-outs (or /var/lib/ofmipd)."""
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path_factory.mktemp("state")))


@pytest.fixture
def capture(tmp_path: Path) -> Path:
    """The directory tests/progs/capture-sendmail stores accepted messages in."""
    directory = tmp_path / "capture"
    directory.mkdir()
    return directory


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Any]:
    """A deployment-recipe workspace (tests/deploy_support.Workspace), closed afterwards."""
    from tests.deploy_support import Workspace

    workspace = Workspace(tmp_path)
    try:
        yield workspace
    finally:
        workspace.close()
