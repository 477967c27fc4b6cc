"""What the run user will be unable to do: the privilege warnings of --check-config.

ofmipd builds its App as root, then drops to the -u user, and some things happen only
after that: password files are read again when they change, the TLS certificate and key,
host rules, sender map and configuration on SIGHUP; the Maildir, the injector and
checkpassword programs are written to or run as that user. A file only root can read works
at start-up and fails at the first edit or reload, so this says so beforehand. The answers
come from the kernel: a child process becomes the run user and asks access(2).
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import shutil
from typing import Any, NamedTuple

from ofmipd import privileges
from ofmipd.app import App
from ofmipd.config import Config
from ofmipd.delivery import MaildirTarget, SendmailTarget
from ofmipd.errors import ConfigError
from ofmipd.privileges import RunUser

SHADOW = "/etc/shadow"
# checkpassword programs that read other users' passwords or switch to the user: both
# need root (DJB's checkpassword, checkpassword-pam, the checkpw package's checkpw).
ROOT_CHECKPASSWORDS = ("checkpassword", "checkpassword-pam", "checkpw", "cmd5checkpw")
VERBS = {  # mode -> (cannot ..., the server ...)
    os.R_OK: ("read", "reads"),
    os.R_OK | os.X_OK: ("read", "reads"),
    os.X_OK: ("run", "runs"),
    os.W_OK | os.X_OK: ("write to", "writes to"),
}


class Need(NamedTuple):
    what: str  # "authfile /etc/ofmipd/users"
    path: str
    mode: int  # os.R_OK, os.X_OK or os.W_OK | os.X_OK
    when: str  # "when it changes and on SIGHUP"


def run_user(app: App) -> tuple[RunUser, bool]:
    """Who the server will run as, and whether it switches to that user to do so."""
    if app.config.username:
        return privileges.lookup(app.config.username), True
    uid = os.geteuid()
    try:
        entry = pwd.getpwuid(uid)
        return RunUser(entry.pw_name, uid, entry.pw_gid), False
    except KeyError:
        return RunUser(str(uid), uid, os.getegid()), False


def needs(app: App) -> list[Need]:
    """Everything the server touches as the run user, with when it does."""
    daemon = not app.config.one_session
    out = backend_needs(app, daemon)
    if daemon:
        out += reloaded_file_needs(app.config)
    out += delivery_needs(app)
    state_dir = getattr(getattr(app.limiter, "store", None), "directory", None)  # SQLite's
    if isinstance(state_dir, str) and os.path.isdir(state_dir):
        out.append(Need("state directory", state_dir, os.W_OK | os.X_OK, "for every login"))
    # Modules imported after the drop (delivery, reload) come from these directories.
    import aiosmtpd

    import ofmipd

    for module in (os, ofmipd, aiosmtpd):
        directory = os.path.dirname(module.__file__ or "")
        out.append(Need("Python code", directory, os.R_OK | os.X_OK, "when a module loads"))
    return out


def backend_needs(app: App, daemon: bool) -> list[Need]:
    out: list[Need] = []
    backend: Any  # each kind has its own attributes: path, argv, settings
    for backend in app.chain.backends:
        if backend.name in ("authfile", "htpasswd", "passwd-file"):
            # -1 reads them before the drop, and a session is over before an edit matters.
            if daemon:
                when = "when it changes and on SIGHUP"
                out.append(Need(backend.name, backend.path, os.R_OK, when))
        elif backend.name == "checkpassword":
            program = checkpassword_program(backend)
            if program:
                out.append(Need("checkpassword program", program, os.X_OK, "for every login"))
        elif backend.name == "ldap" and backend.settings.ca_file:
            ca = backend.settings.ca_file
            out.append(Need("LDAP ca_file", ca, os.R_OK, "for every new LDAP connection"))
    return out


def reloaded_file_needs(config: Config) -> list[Need]:
    """The files a daemon reads again on SIGHUP."""
    reload = "on SIGHUP"
    out: list[Need] = []
    for spec in config.auth:
        for key, value in spec.options.items():
            if key.endswith("_file") and isinstance(value, str):
                out.append(Need(f"{spec.kind} {key}", value, os.R_OK, reload))
    tls = config.ssl or config.tls
    for what, path in (
        ("TLS certificate", config.ssl_cert if tls else None),
        ("TLS key", config.ssl_key if tls else None),
        ("host rules", config.rules),
        ("sender map", config.sender_map),
        ("configuration", config.source if config.source != "command line" else None),
    ):
        if path:
            out.append(Need(what, path, os.R_OK, reload))
    return out


def delivery_needs(app: App) -> list[Need]:
    out: list[Need] = []
    target = app.delivery.target
    if isinstance(target, MaildirTarget):
        for sub in ("tmp", "new"):
            path = os.path.join(target.path, sub)
            out.append(Need("Maildir", path, os.W_OK | os.X_OK, "for every message"))
    elif isinstance(target, SendmailTarget) and target.argv:
        out.append(Need("injector", target.argv[0], os.X_OK, "for every message"))
    script = app.config.throttle_script
    if script:
        out.append(Need("throttle script", script, os.X_OK, "for every message"))
    return out


def checkpassword_program(backend: Any) -> str | None:
    argv = list(backend.argv)
    if argv[:2] == ["/bin/sh", "-c"]:
        try:
            argv = shlex.split(argv[2])
        except (ValueError, IndexError):
            return None
    if not argv:
        return None
    return argv[0] if "/" in argv[0] else shutil.which(argv[0])


def probe(user: RunUser | None, paths: list[tuple[str, int]]) -> list[bool]:
    """access(2) for each (path, mode), as `user` (None: as we are now)."""
    if user is None:
        return [os.access(path, mode) for path, mode in paths]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child only makes system calls, then leaves without clean-up
        try:
            os.close(read)
            privileges.drop(user.name)
            os.write(write, bytes(os.access(path, mode) for path, mode in paths))
            os._exit(0)
        except BaseException:  # noqa: BLE001 - a forked child must never return into our stack
            os._exit(1)
    os.close(write)
    with os.fdopen(read, "rb") as answers:
        data = answers.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or len(data) != len(paths):
        raise ConfigError(f"--username {user.name}: could not become this user to check access")
    return [bool(answer) for answer in data]


def describe_user(user: RunUser) -> str:
    names = []
    for gid in os.getgrouplist(user.name, user.gid):
        try:
            names.append(grp.getgrgid(gid).gr_name)
        except KeyError:
            names.append(str(gid))
    return f"{user.name} (uid {user.uid}, groups {' '.join(names)})"


def report(app: App) -> list[str]:
    """The "run as" line, then one "warning:" line for each thing the run user cannot do."""
    user, switches = run_user(app)
    lines = [f"run as: {describe_user(user)}" + (" after start-up" if switches else "")]
    if switches and user.uid != os.geteuid() and os.geteuid() != 0:
        lines.append(f"warning: only root can switch to {user.name}; not checked what it can reach")
        return lines
    wanted = needs(app)
    paths = [(need.path, need.mode) for need in wanted]
    pam = any(backend.name == "pam" for backend in app.chain.backends)
    if pam:
        paths.append((SHADOW, os.R_OK))
    answers = probe(user if switches else None, paths)
    for need, allowed in zip(wanted, answers, strict=False):
        if not allowed:
            cannot, does = VERBS[need.mode]
            lines.append(
                f"warning: {need.what} {need.path}: user {user.name} cannot {cannot} it, "
                f"but the server {does} it as that user {need.when}"
            )
    if pam and user.uid != 0 and not answers[-1]:
        lines.append(
            f"warning: PAM as {user.name}: it cannot read {SHADOW}, so pam_unix can check "
            f"only {user.name}'s own password (its unix_chkpwd helper refuses others); "
            "run as root or add the user to group shadow"
        )
    if user.uid != 0:
        for backend in app.chain.backends:
            program = backend.name == "checkpassword" and checkpassword_program(backend)
            if program and os.path.basename(program) in ROOT_CHECKPASSWORDS:
                lines.append(
                    f"warning: checkpassword {program} runs as {user.name}: it reads other "
                    "users' passwords and switches to them, which needs root"
                )
    return lines
