"""Files that may hold secrets (the TOML configuration, *_password_file): warn when other
local users can read them, as htpasswd does for its hashes."""

from __future__ import annotations

import logging
import os
import stat

log = logging.getLogger("ofmipd")


def warn_if_shared(st: os.stat_result, path: str, what: str) -> None:
    """One warning when `st` (from fstat of the open file) lets group or others read it."""
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning(
            "%s %s is %s-readable (mode %04o): other local users can read the secrets in "
            "it; chmod 0600, owned by the user ofmipd runs as",
            what,
            path,
            "world" if mode & stat.S_IROTH else "group",
            mode,
        )
