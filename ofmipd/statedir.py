"""The state directory: where ofmipd keeps what must outlive one process (the SQLite store).

`--state-dir DIR` (TOML `state_dir`), else systemd's `$STATE_DIRECTORY` (the first of
a colon-separated list), else /var/lib/ofmipd. The directory is created mode 0700 and
owned by the run user (`-u`), at start-up while ofmipd may still be root; the files in
it are made later, by the run user. A directory or file that is a symlink, belongs to
anyone else, or that others may write is refused: another local user who could write
there could erase the lock-outs or plant a file for root to follow.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from typing import NamedTuple

DEFAULT = "/var/lib/ofmipd"
DB_NAME = "ofmipd.db"
# What ofmipd itself keeps there: a root-owned directory holding nothing else (systemd's
# StateDirectory= of a unit without User=) may be handed to the run user.
OUR_FILES = frozenset({DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", DB_NAME + "-journal"})


class Unusable(Exception):
    """The state directory or a file in it cannot be used; str() says why, in one line."""


class Owner(NamedTuple):
    uid: int
    gid: int
    name: str


def resolve(configured: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """The state directory's absolute path."""
    path = configured or environ.get("STATE_DIRECTORY", "").split(":")[0] or DEFAULT
    return os.path.abspath(path)


def run_owner(username: str | None) -> Owner:
    """Who the files must belong to: the -u user, else whoever runs this process."""
    if username:
        import pwd

        try:
            entry = pwd.getpwnam(username)
        except KeyError:
            raise Unusable(f"no such user {username!r}") from None
        return Owner(entry.pw_uid, entry.pw_gid, username)
    return Owner(os.geteuid(), os.getegid(), f"uid {os.geteuid()}")


def open_dir(path: str, owner: Owner) -> int:
    """Create (0700, owned by `owner`) or check the directory; return an fd of it."""
    created = False
    try:
        os.mkdir(path, 0o700)
        created = True
    except FileExistsError:
        pass
    except OSError as error:
        raise Unusable(f"cannot create {path}: {error.strerror}") from None
    fd = _open_no_symlink(path, path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid != owner.uid and os.geteuid() == 0:
            if created or (st.st_uid == 0 and set(os.listdir(fd)) <= OUR_FILES):
                _hand_over(fd, owner)
                st = os.fstat(fd)
        if created:
            os.fchmod(fd, 0o700)
            st = os.fstat(fd)
        check(st, path, owner)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_no_symlink(path: str, name: str, flags: int, dir_fd: int | None = None) -> int:
    """os.open with O_NOFOLLOW in `flags`; a failure says whether a symlink was the cause."""
    try:
        return os.open(name, flags, 0o600, dir_fd=dir_fd)
    except OSError as error:
        if os.path.islink(path):
            raise Unusable(f"{path} is a symlink") from None
        raise Unusable(f"cannot open {path}: {error.strerror}") from None


def _hand_over(dir_fd: int, owner: Owner) -> None:
    os.fchown(dir_fd, owner.uid, owner.gid)
    for name in OUR_FILES:
        try:
            os.chown(name, owner.uid, owner.gid, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            pass


def check(st: os.stat_result, path: str, owner: Owner) -> None:
    if st.st_uid != owner.uid:
        raise Unusable(f"{path} belongs to uid {st.st_uid}, not {owner.name}")
    if st.st_mode & 0o022:
        raise Unusable(f"{path} is writable by group or others (mode {st.st_mode & 0o7777:o})")


def open_file(dir_fd: int, directory: str, name: str, owner: Owner) -> None:
    """Create `name` (0600, owned by `owner`) or check it: a regular file, not a symlink."""
    path = os.path.join(directory, name)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = _open_no_symlink(path, name, flags, dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Unusable(f"{path} is not a regular file")
        if st.st_uid != owner.uid and os.geteuid() == 0 and st.st_size == 0:
            os.fchown(fd, owner.uid, owner.gid)  # made by root now, used by the run user
            st = os.fstat(fd)
        check(st, path, owner)
    finally:
        os.close(fd)


def prepare(path: str, username: str | None) -> str:
    """At start-up (perhaps as root): create the directory and the database file for the
    run user. Returns the database path; raises Unusable."""
    owner = run_owner(username)
    fd = open_dir(path, owner)
    try:
        open_file(fd, path, DB_NAME, owner)
    finally:
        os.close(fd)
    return os.path.join(path, DB_NAME)
