"""The state directory and the SQLite store in it: where it is, who may own it, what a
hostile or broken file does (the store becomes unavailable, never a hang or a crash)."""

from __future__ import annotations

import asyncio
import os
import pwd
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ofmipd import statedir
from ofmipd.store import Grant, Ladder, Limit, StoreDown
from ofmipd.store_sqlite import SQLiteStore

LIMIT = Limit("ip:192.0.2.7", 20, 60.0, Ladder(60.0, 3600.0, 3600.0))
NOBODY = pwd.getpwnam("nobody")


def reserve(store: SQLiteStore) -> Grant:
    async def run() -> Grant:
        try:
            grant = await store.reserve([LIMIT], 4, 30.0)
            assert isinstance(grant, Grant)
            return grant
        finally:
            await store.close()

    return asyncio.run(run())


def unavailable(store: SQLiteStore) -> str:
    with pytest.raises(StoreDown) as error:
        reserve(store)
    return str(error.value)


def test_the_state_dir_comes_from_the_flag_then_systemd_then_the_default(tmp_path: Path) -> None:
    env = {"STATE_DIRECTORY": f"{tmp_path}/a:{tmp_path}/b"}  # systemd: one per StateDirectory=
    assert statedir.resolve(None, env) == f"{tmp_path}/a"
    assert statedir.resolve(str(tmp_path / "flag"), env) == str(tmp_path / "flag")
    assert statedir.resolve(None, {}) == "/var/lib/ofmipd"
    assert statedir.resolve(None, {"STATE_DIRECTORY": ""}) == "/var/lib/ofmipd"
    assert statedir.resolve("relative", {}) == os.path.abspath("relative")


def test_the_state_dir_is_created_0700_with_the_database_0600(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "state"))
    assert store.problem is None
    reserve(store)
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "state" / "ofmipd.db").stat().st_mode & 0o777 == 0o600
    db = sqlite3.connect(tmp_path / "state" / "ofmipd.db")
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert db.execute("SELECT count(*) FROM holds").fetchone() == (1,)


def test_a_symlinked_state_dir_or_database_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert "link is a symlink" in unavailable(SQLiteStore(str(tmp_path / "link")))
    (tmp_path / "state").mkdir(mode=0o700)
    (tmp_path / "target.db").write_bytes(b"")
    (tmp_path / "state" / "ofmipd.db").symlink_to(tmp_path / "target.db")
    store = SQLiteStore(str(tmp_path / "state"))
    assert store.problem is not None and "ofmipd.db is a symlink" in store.problem
    assert "ofmipd.db is a symlink" in unavailable(store)
    assert (tmp_path / "target.db").read_bytes() == b""
    assert not list((tmp_path / "real").iterdir())


def test_a_state_dir_others_may_write_or_that_belongs_to_another_user_is_refused(
    tmp_path: Path,
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: anyone could delete the database and its lockouts
    assert "writable by group or others (mode 1777)" in unavailable(SQLiteStore(str(shared)))
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY.pw_uid, NOBODY.pw_gid)
    assert f"belongs to uid {NOBODY.pw_uid}" in unavailable(SQLiteStore(str(theirs)))
    assert os.stat(theirs).st_uid == NOBODY.pw_uid  # not taken over: it is not ours


def test_a_database_that_is_not_a_file_or_not_a_database_is_unavailable_until_repaired(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.mkfifo(state / "ofmipd.db")  # a reader that would block forever
    start = time.monotonic()
    assert "not a regular file" in unavailable(SQLiteStore(str(state)))
    assert time.monotonic() - start < 5
    os.unlink(state / "ofmipd.db")
    (state / "ofmipd.db").write_bytes(b"garbage, not SQLite " * 100)
    (state / "ofmipd.db").chmod(0o600)
    store = SQLiteStore(str(state))

    async def run() -> tuple[str, object]:
        try:
            with pytest.raises(StoreDown) as error:
                await store.reserve([LIMIT], 4, 30.0)
            (state / "ofmipd.db").unlink()  # the admin repairs it; no restart needed
            return str(error.value), await store.reserve([LIMIT], 4, 30.0)
        finally:
            await store.close()

    reason, later = asyncio.run(run())
    assert "file is not a database" in reason
    assert isinstance(later, Grant)


def test_root_hands_an_empty_state_dir_to_the_run_user_but_nothing_else(tmp_path: Path) -> None:
    # systemd's StateDirectory= in a unit without User= is root's; ofmipd starts as root
    # with -u and gives it to the run user, with the files ofmipd itself made there.
    systemd = tmp_path / "systemd"
    systemd.mkdir(mode=0o755)
    (systemd / "ofmipd.db").write_bytes(b"")
    store = SQLiteStore(str(systemd), "nobody")
    assert store.problem is None
    for path in (systemd, systemd / "ofmipd.db"):
        assert (path.stat().st_uid, path.stat().st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid)
    busy = tmp_path / "busy"  # --state-dir /etc by mistake: never chown that
    busy.mkdir(mode=0o755)
    (busy / "passwd").write_text("x")
    store = SQLiteStore(str(busy), "nobody")
    assert store.problem == f"{busy} belongs to uid 0, not nobody"
    assert busy.stat().st_uid == 0
    assert SQLiteStore(str(tmp_path / "x"), "no-such-user-here").problem == (
        "no such user 'no-such-user-here'"
    )


def test_a_lock_held_by_another_process_delays_only_that_call_not_the_event_loop(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(str(tmp_path / "state"), busy_timeout=0.5)
    reserve(store)  # creates the database
    other = sqlite3.connect(tmp_path / "state" / "ofmipd.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock

    async def run() -> tuple[float, str]:
        gaps: list[float] = []

        async def tick() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticker = asyncio.ensure_future(tick())
        try:
            with pytest.raises(StoreDown) as error:
                await store.reserve([LIMIT], 4, 30.0)
        finally:
            ticker.cancel()
            await store.close()
        return max(gaps), str(error.value)

    longest_gap, reason = asyncio.run(run())
    other.execute("ROLLBACK")
    assert "database is locked" in reason
    assert longest_gap < 0.25  # the loop went on while the store's thread waited
    reserve(store)  # the lock is gone: the store works again


BUSY_SIBLING = """
import fcntl, os, sqlite3, sys, time
# Another ofmipd process writing back to back, as a loaded --workers sibling does: it
# queues on the directory's flock as the store does, then holds SQLite's write lock for
# 20 ms, with a millisecond between transactions.
queue = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
db = sqlite3.connect(os.path.join(sys.argv[1], "ofmipd.db"), isolation_level=None)
print("writing", flush=True)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    fcntl.flock(queue, fcntl.LOCK_EX)
    db.execute("BEGIN IMMEDIATE")
    time.sleep(0.02)
    db.execute("COMMIT")
    fcntl.flock(queue, fcntl.LOCK_UN)
    time.sleep(0.001)
"""


@pytest.mark.slow
def test_a_process_writing_back_to_back_cannot_starve_another(tmp_path: Path) -> None:
    # SQLite's busy handler alone polls, every 100 ms at last, and missed a sibling's
    # lock at every poll for the whole busy timeout (seen as fail-open in the benchmark
    # with --workers 2). Writers queue on an flock instead, woken at each release.
    store = SQLiteStore(str(tmp_path / "state"), busy_timeout=0.3)
    reserve(store)  # creates the database
    sibling = subprocess.Popen(
        [sys.executable, "-c", BUSY_SIBLING, str(tmp_path / "state"), "3"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sibling.stdout is not None and sibling.stdout.readline() == "writing\n"

        async def run() -> int:
            down = 0
            for _ in range(15):
                try:
                    await store.reserve([LIMIT], 1, 30.0)
                except StoreDown:
                    down += 1
            await store.close()
            return down

        assert asyncio.run(run()) == 0
        assert sibling.poll() is None  # it was writing all along
    finally:
        sibling.wait(10)


FIRST_USE = """
import asyncio, sys, time
from ofmipd.store import Ladder, Limit, StoreDown
from ofmipd.store_sqlite import SQLiteStore

store = SQLiteStore(sys.argv[1])
limit = Limit("ip:192.0.2.7", 100, 60.0, Ladder(60.0, 3600.0, 3600.0))
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all at once
try:
    asyncio.run(store.reserve([limit], 1, 30.0))
    print("ok")
except StoreDown as error:
    print(error)
"""


@pytest.mark.slow
def test_processes_opening_a_new_database_at_once_all_use_it(tmp_path: Path) -> None:
    # --workers siblings, or one-session processes, at their first AUTH on a new file:
    # each switches it to WAL and creates the schema, which must not fail any of them.
    state = tmp_path / "state"
    SQLiteStore(str(state))  # the directory and an empty file, as at start-up
    start = time.time() + 1.5
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FIRST_USE, str(state), str(start)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    answers = [proc.communicate(timeout=60)[0].strip() for proc in procs]
    assert answers == ["ok"] * 8
