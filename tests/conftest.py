"""Shared test helpers: free loopback ports (tests/ports.py) and client identities."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ofmipd.identity import ClientIdentity  # noqa: E402
from tests.ports import free_port as free_port  # noqa: E402  (imported from here by tests)

# Fixtures that change machine-wide state (system users, /etc/pam.d services): a test
# using one is marked `root`, and all such tests share one xdist worker (run with
# --dist loadgroup), because useradd and friends fail while another holds /etc/passwd.
MACHINE_WIDE_FIXTURES = {"make_user", "make_service", "pam_user", "checkpw_user"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & MACHINE_WIDE_FIXTURES or item.get_closest_marker("root"):
            item.add_marker(pytest.mark.root)
            item.add_marker(pytest.mark.xdist_group("machine-wide"))


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
