"""A file re-read when it changes, so edits to user files take effect without a restart.

Each get() costs one os.stat. The file is read again when its (mtime, ctime, size, inode,
device) changes: an editor that saves by rename gives a new inode, one that rewrites in
place a new mtime or size, a chmod or chown a new ctime. A write in the same timestamp
tick as our last read can keep them all the same ("racy git"), so a file read less than
RACY_SECONDS after its mtime is read again on the next call; identical bytes are not
parsed again.

The check (e.g. "mode 0600") judges the descriptor the bytes are read from (fstat), never
the path: a file swapped in between a stat and an open cannot pass one test and supply the
other's contents. A FIFO or device is refused without waiting on it.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
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
    """`parse` turns the file's bytes into T; `check` may veto the fstat of what is read (its mode).

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
        self._key: tuple[int, ...] | None = None
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
            key = _key(os.stat(self.path))
        except OSError as error:
            raise Unavailable(f"{self.label} {self.path}: {error.strerror}") from None
        with self._lock:
            if key != self._key or self._racy or self._value is None:
                self._load(key)
            assert self._value is not None
            return self._value

    def _load(self, key: tuple[int, ...]) -> None:
        # O_NONBLOCK: opening a FIFO would otherwise wait for a writer, forever.
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags)
        except PermissionError as error:
            if self._value is not None and key == self._key:
                # Only the precautionary re-read of a recently written file failed, and
                # the file is exactly as it was when we read it (e.g. as root, before -u
                # took effect): what we have is what it holds.
                return
            raise Unavailable(f"{self.label} {self.path}: {error.strerror}") from None
        except OSError as error:
            raise Unavailable(f"{self.label} {self.path}: {error.strerror}") from None
        try:
            # The check and the key come from the descriptor we read, not the path: if
            # the file changes while we read, the next stat differs and we read again.
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise Unavailable(f"{self.label} {self.path}: {os.strerror(errno.EISDIR)}")
            if not stat.S_ISREG(st.st_mode):
                raise Unavailable(f"{self.label} {self.path}: not a regular file")
            if self._check is not None:
                self._check(st)
            data = _read_all(fd)
        except OSError as error:
            raise Unavailable(f"{self.label} {self.path}: {error.strerror}") from None
        finally:
            os.close(fd)
        digest = hashlib.sha256(data).digest()
        if self._value is None or digest != self._digest:
            self._value = self._parse(data)
            self._digest = digest
            self.loads += 1
        self._key = _key(st)
        self._racy = time.time_ns() - st.st_mtime_ns < RACY_SECONDS * 1e9

    def _note_trouble(self, reason: str) -> None:
        if reason != self._trouble:
            log.warning("%s", reason)
            self._trouble = reason


def _key(st: os.stat_result) -> tuple[int, ...]:
    """What changes when the file's contents, or what the check judges, may have changed."""
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_dev)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)
