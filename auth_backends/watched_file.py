"""A file re-read when it changes, so edits to user files take effect without a restart.

Each get() costs one os.stat. The file is read again when its (mtime_ns, size, inode,
device) changes: an editor that saves by rename gives a new inode, one that rewrites in
place a new mtime or size. A write in the same timestamp tick as our last read can keep
all four the same ("racy git"), so a file read less than RACY_SECONDS after its mtime
is read again on the next call; identical bytes are not parsed again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger("ofmipd.watched_file")

RACY_SECONDS = 2.0  # coarser than any local file system's timestamp granularity (FAT: 2 s)


class Unavailable(Exception):
    """The file cannot be used now; str(error) is one line for the admin, without contents."""


class WatchedFile(Generic[T]):
    """`parse` turns the file's bytes into T; `check` may veto a stat result (e.g. its mode).

    Thread-safe: backends that verify in worker threads call get() there.
    """

    def __init__(
        self,
        label: str,
        path: str,
        parse: Callable[[bytes], T],
        check: Callable[[os.stat_result], None] | None = None,
    ) -> None:
        self.label = label  # e.g. "authfile", the start of every message
        self.path = path
        self._parse = parse
        self._check = check
        self._lock = threading.Lock()
        self._key: tuple[int, int, int, int] | None = None
        self._racy = True
        self._digest = b""
        self._value: T | None = None
        self._trouble: str | None = None  # the last reason logged, so an outage logs once
        self.loads = 0  # how many times the file was parsed (for tests and metrics)

    def get(self) -> T:
        """The parsed contents as of now; raises Unavailable (and logs it once) if unusable."""
        try:
            value = self._current()
        except Unavailable as error:
            self._note_trouble(str(error))
            raise
        if self._trouble is not None:
            log.warning("%s %s is usable again", self.label, self.path)
            self._trouble = None
        return value

    def _current(self) -> T:
        try:
            st = os.stat(self.path)
        except OSError as error:
            raise Unavailable(f"{self.label} {self.path}: {error.strerror}") from None
        if self._check is not None:
            self._check(st)
        key = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
        with self._lock:
            if key != self._key or self._racy or self._value is None:
                self._load()
            assert self._value is not None
            return self._value

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as handle:
                # The key comes from the descriptor we read, not the earlier stat: if the
                # file changes while we read, the next stat differs and we read again.
                st = os.fstat(handle.fileno())
                data = handle.read()
        except OSError as error:
            raise Unavailable(f"{self.label} {self.path}: {error.strerror}") from None
        digest = hashlib.sha256(data).digest()
        if self._value is None or digest != self._digest:
            self._value = self._parse(data)
            self._digest = digest
            self.loads += 1
        self._key = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
        self._racy = time.time_ns() - st.st_mtime_ns < RACY_SECONDS * 1e9

    def _note_trouble(self, reason: str) -> None:
        if reason != self._trouble:
            log.warning("%s", reason)
            self._trouble = reason
