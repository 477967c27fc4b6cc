"""Becoming the -u user: look it up, check the switch is allowed, switch with its groups.

Both launchers use this: the daemon after binding its sockets, one-session mode before
it reads the first client byte. Each builds its App first, as root, because that reads
files only root may read (the TLS key, the authfile).
"""

from __future__ import annotations

import os
import pwd
from typing import NamedTuple

from ofmipd.errors import ConfigError


class RunUser(NamedTuple):
    name: str
    uid: int
    gid: int  # the primary group; supplementary ones come from the group database


def lookup(username: str) -> RunUser:
    try:
        entry = pwd.getpwnam(username)
    except KeyError:
        raise ConfigError(f"--username {username}: no such user") from None
    return RunUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


def drop(username: str) -> None:
    """Become `username` for good; ConfigError if that is not possible.

    Already that user: nothing to do. Another user without root: refused, since going on
    would run the injector and every backend with privileges the admin did not intend.
    """
    user = lookup(username)
    if os.getuid() != 0:
        if os.getuid() != user.uid:
            raise ConfigError(f"--username {username}: only root can change user")
        return
    # The user's supplementary groups too, as login(1) and su(1) set them, so membership
    # in ssl-cert (a key re-read on SIGHUP) or shadow (pam_unix) keeps working.
    os.initgroups(user.name, user.gid)
    os.setresgid(user.gid, user.gid, user.gid)
    os.setresuid(user.uid, user.uid, user.uid)
    if user.uid != 0:
        # Like OpenSSH's permanently_set_uid: prove root cannot be regained.
        try:
            os.setuid(0)
        except PermissionError:
            return
        raise ConfigError(f"--username {username}: root could be regained; refusing to run")
