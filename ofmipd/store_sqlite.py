"""The SQLite store: counters and records shared by every ofmipd process on one host.

One file, <state dir>/ofmipd.db (ofmipd/statedir.py), in WAL mode with
synchronous=NORMAL: readers never wait for the writer, and a commit costs no fsync
(a power cut may forget the last few failures, never corrupt the file). `ofmipd -1`
processes, --workers and reloads all see the same counters.

Every call runs on one dedicated thread per process, so the event loop never blocks:
a lock held by another process (a busy timeout of 2 s, then StoreDown) delays only that
call. Check-and-reserve is one `BEGIN IMMEDIATE` transaction, atomic across processes.
Writers queue for it on an flock of the state directory first (see _write).
The database is opened on first use, after the privilege drop, so its files belong to
the run user; and again after any error, so a repaired file is picked up. Rows whose
time is over are pruned now and then by whichever process happens to be writing.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ofmipd import statedir
from ofmipd.store import Blocked, Counter, Grant, Limit, StoreDown, new_token

SCHEMA_VERSION = 1
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, used INTEGER NOT NULL,"
    " window_end REAL NOT NULL, level INTEGER NOT NULL, level_end REAL NOT NULL,"
    " locked_until REAL NOT NULL, expires REAL NOT NULL) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS counters_expires ON counters (expires)",
    "CREATE TABLE IF NOT EXISTS holds (key TEXT NOT NULL, token TEXT NOT NULL,"
    " units INTEGER NOT NULL, expires REAL NOT NULL, PRIMARY KEY (key, token)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS holds_token ON holds (token)",
    "CREATE TABLE IF NOT EXISTS records (key TEXT PRIMARY KEY, value TEXT NOT NULL,"
    " expires REAL NOT NULL) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS records_expires ON records (expires)",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)
PRUNE_ONE_IN = 32  # writes; cheap with the indexes, and no process needs to be in charge


class SQLiteStore:
    name = "sqlite"

    def __init__(
        self,
        directory: str,
        username: str | None = None,
        busy_timeout: float = 2.0,
        clock: Callable[[], float] = time.time,  # wall clock: shared between processes
    ) -> None:
        self.directory = directory
        self.path = os.path.join(directory, statedir.DB_NAME)
        self.username = username
        self.busy_timeout = busy_timeout
        self.clock = clock
        self.problem: str | None = None
        try:  # now, while we may still be root: the directory for the run user
            statedir.prepare(directory, username)
        except statedir.Unusable as error:
            self.problem = str(error)  # tried again on first use; --check-config shows it
        self._executor: ThreadPoolExecutor | None = None
        self._pid = 0
        self._db: Any = None  # sqlite3.Connection, touched by the store's thread only
        self._queue: int | None = None  # the state directory, whose flock writers queue on

    def describe(self) -> str:
        from ofmipd.logs import printable

        text = f"sqlite {printable(self.path)}"
        return text + (f" (unusable: {printable(self.problem)})" if self.problem else "")

    # ---- the store interface ------------------------------------------------------------

    async def reserve(self, limits: Sequence[Limit], units: int, hold: float) -> Grant | Blocked:
        result: Grant | Blocked = await self._call(self._reserve, list(limits), units, hold)
        return result

    async def settle(
        self, grant: Grant, charge: int, keys: Sequence[str] | None = None
    ) -> list[float]:
        started: list[float] = await self._call(
            self._settle, grant, charge, None if keys is None else set(keys)
        )
        return started

    async def forgive(self, keys: Sequence[str]) -> None:
        if keys:
            await self._call(self._forgive, list(keys))

    async def get(self, key: str) -> str | None:
        value: str | None = await self._call(self._get, key)
        return value

    async def put(self, key: str, value: str, ttl: float) -> None:
        await self._call(self._put, key, value, ttl)

    async def close(self) -> None:
        if self._executor is not None and self._pid == os.getpid():
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._close_db)
            self._executor.shutdown(wait=False)
        self._executor = None

    # ---- on the store's thread -------------------------------------------------------------

    async def _call(self, work: Callable[..., Any], *args: Any) -> Any:
        if self._executor is None or self._pid != os.getpid():
            # After a fork the parent's thread and connection are not ours to use.
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="ofmipd-store")
            self._pid, self._db = os.getpid(), None  # _connect closes the parent's _queue
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._run, work, args)
        try:
            return await asyncio.wait_for(future, self.busy_timeout * 2 + 1)
        except TimeoutError:
            seconds = self.busy_timeout * 2 + 1
            raise StoreDown(f"no answer from {self.path} within {seconds:g}s") from None

    def _run(self, work: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        import sqlite3

        try:
            if self._db is None:
                self._db = self._connect()
            return work(*args)
        except statedir.Unusable as error:
            raise StoreDown(str(error)) from None
        except (sqlite3.Error, OSError) as error:
            self._close_db()  # reopened on the next call: the file may have been repaired
            raise StoreDown(f"{self.path}: {error or type(error).__name__}") from None

    def _connect(self) -> Any:
        import sqlite3

        self._close_db()  # a descriptor left by a failed attempt
        statedir.prepare(self.directory, self.username)  # checks again: it may have changed
        self._queue = os.open(
            self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        )
        # Under the writers' flock: two processes opening a new file at once would both
        # switch it to WAL and create the schema, and SQLite answers one of them "database
        # is locked" at once, without waiting.
        fcntl.flock(self._queue, fcntl.LOCK_EX)
        try:
            db = sqlite3.connect(
                self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=True
            )
            try:
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = NORMAL")
                if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                    self._transaction(db, lambda: self._create(db))
            except BaseException:
                db.close()
                raise
        finally:
            fcntl.flock(self._queue, fcntl.LOCK_UN)
        self.problem = None
        return db

    @staticmethod
    def _create(db: Any) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise statedir.Unusable(f"made by a newer ofmipd (schema {version})")
        for statement in SCHEMA:
            db.execute(statement)

    def _close_db(self) -> None:
        if self._db is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close
                self._db.close()
            self._db = None
        if self._queue is not None:
            os.close(self._queue)
            self._queue = None

    def _write(self, work: Callable[[], Any]) -> Any:
        # Writers of every process queue on an flock first. SQLite's own busy handler polls,
        # every 100 ms at last, and a process that writes back to back (a busy --workers
        # sibling) can hold the lock at each poll for the whole busy timeout: the AUTH then
        # failed open. A blocked flock is woken as soon as the lock is released; the kernel
        # drops the lock of a process that dies. (On the directory, not the database: closing
        # any descriptor of the database would drop SQLite's own POSIX locks.)
        assert self._queue is not None
        fcntl.flock(self._queue, fcntl.LOCK_EX)
        try:
            return self._transaction(self._db, work)
        finally:
            fcntl.flock(self._queue, fcntl.LOCK_UN)

    @staticmethod
    def _transaction(db: Any, work: Callable[[], Any]) -> Any:
        # IMMEDIATE takes the write lock first, so a check and the write that depends on it
        # cannot interleave with another process's.
        db.execute("BEGIN IMMEDIATE")
        try:
            result = work()
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    def _load(self, key: str, now: float) -> Counter:
        db = self._db
        row = db.execute(
            "SELECT used, window_end, level, level_end, locked_until FROM counters WHERE key = ?",
            (key,),
        ).fetchone()
        counter = Counter(*row) if row else Counter()
        for token, units, expires in db.execute(
            "SELECT token, units, expires FROM holds WHERE key = ? AND expires > ?", (key, now)
        ):
            counter.holds[token] = (units, expires)
        return counter

    def _save(self, key: str, counter: Counter) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO counters VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key, counter.used, counter.window_end, counter.level, counter.level_end,
             counter.locked_until, counter.expires()),
        )  # fmt: skip

    def _reserve(self, limits: list[Limit], units: int, hold: float) -> Grant | Blocked:
        now = self.clock()

        def work() -> Grant | Blocked:
            used = []
            for limit in limits:
                counter = self._load(limit.key, now)
                blocked = counter.check(limit, units, now)
                if blocked is not None:
                    return blocked
                used.append(counter.counted(now))
            grant = Grant(new_token(), tuple(limits), units, now + hold, tuple(used))
            self._db.executemany(
                "INSERT OR REPLACE INTO holds VALUES (?, ?, ?, ?)",
                [(limit.key, grant.token, units, grant.expires) for limit in limits],
            )
            return grant

        result: Grant | Blocked = self._write(work)
        return result

    def _settle(self, grant: Grant, charge: int, keys: set[str] | None) -> list[float]:
        now = self.clock()

        def work() -> list[float]:
            self._db.execute("DELETE FROM holds WHERE token = ?", (grant.token,))
            started = []
            for limit in grant.limits:
                seconds = 0.0
                if charge > 0 and (keys is None or limit.key in keys):
                    counter = self._load(limit.key, now)
                    seconds = counter.charge(limit, charge, now)
                    self._save(limit.key, counter)
                started.append(seconds)
            if os.urandom(1)[0] < 256 // PRUNE_ONE_IN:
                self._prune(now)
            return started

        started: list[float] = self._write(work)
        return started

    def _prune(self, now: float) -> None:
        self._db.execute("DELETE FROM counters WHERE expires <= ?", (now,))
        self._db.execute("DELETE FROM holds WHERE expires <= ?", (now,))
        self._db.execute("DELETE FROM records WHERE expires <= ?", (now,))

    def _forgive(self, keys: list[str]) -> None:
        self._write(
            lambda: self._db.executemany(
                "UPDATE counters SET used = 0, window_end = 0 WHERE key = ?", [(k,) for k in keys]
            ),
        )

    def _get(self, key: str) -> str | None:
        row = self._db.execute(
            "SELECT value FROM records WHERE key = ? AND expires > ?", (key, self.clock())
        ).fetchone()
        return None if row is None else str(row[0])

    def _put(self, key: str, value: str, ttl: float) -> None:
        self._write(
            lambda: self._db.execute(
                "INSERT OR REPLACE INTO records VALUES (?, ?, ?)", (key, value, self.clock() + ttl)
            ),
        )
