"""After DATA: the Received header, the throttle script, and the hand-off to an injector.

The reply is 250 only once the target has the message safely: the injector
exited 0, or the Maildir file was fsynced and renamed into new/. Anything else
is a 4xx, so the client keeps responsibility for the message.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import re
import shlex
import socket
import stat
import time
from typing import TYPE_CHECKING, NamedTuple, Protocol

from ofmipd.identity import LAUNCHER_VARIABLES, ClientIdentity, launcher_environment
from ofmipd.logs import printable
from ofmipd.proc import environment, run_program

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("ofmipd.delivery")

ACCEPTED = "250 2.0.0 OK: queued as {queue_id}"
INJECTOR_FAILED = "451 4.3.0 Temporary delivery failure, try again later"
THROTTLED = "450 4.7.1 Message refused by the sending limit, try again later"

# --injector-exits: the reply after DATA for the injector's exit status, by profile.
# sysexits follows Postfix's sys_exits.c as issue 14 tabulates it. A status a profile
# does not list, a signal or a timeout is INJECTOR_FAILED: a 4xx is never wrong when
# unsure. The texts are fixed; what the injector said stays in the log.
_REFUSED = "554 5.3.0 Message refused by the mail system"
_SYSEXITS = {code: _REFUSED for code in range(64, 79)} | {
    65: "554 5.6.0 Message refused: data format error",
    67: "550 5.1.1 Recipient address refused: user unknown",
    68: "550 5.1.2 Recipient address refused: host unknown",
    71: INJECTOR_FAILED,
    73: "552 5.2.0 Message refused: cannot be stored",
    75: INJECTOR_FAILED,
    77: "550 5.7.1 Message refused: permission denied",
}
INJECTOR_EXITS: dict[str, dict[int, str]] = {
    "sysexits": _SYSEXITS,
    "qmail": {100: _REFUSED, 111: INJECTOR_FAILED},  # qmail-inject: 100 permanent, 111 not
    # msmtp exits 69 for its server's 4xx to RCPT too, and 68 when it cannot resolve its own
    # server (a DNS outage or a typo in its configuration, not a bad recipient).
    "msmtp": _SYSEXITS | {68: INJECTOR_FAILED, 69: INJECTOR_FAILED},
    "tempfail": {},  # every failure is 451, as before --injector-exits
}
STDERR_LINES = 3  # of the injector's stderr, into the log line for that message
STDERR_BYTES = 512


class Submission(NamedTuple):
    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    content: bytes  # with our Received header first
    user: str | None
    client: ClientIdentity


def new_queue_id() -> str:
    return f"{int(time.time()):X}{os.urandom(4).hex().upper()}"


_UNSAFE = r"[^\x21-\x7e]|[()\\]"  # compiled by re on first use (once per message)


def _clean(text: str | None, fallback: str = "unknown") -> str:
    """Header-safe token: no CR/LF, parentheses or spaces that could forge a clause."""
    return re.sub(_UNSAFE, "?", text)[:255] if text else fallback


def protocol_name(esmtp: bool, tls: bool, authenticated: bool) -> str:
    """RFC 3848 'with' keyword: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA."""
    if not esmtp:
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if authenticated else "")


def received_header(
    *,
    helo: str | None,
    client: ClientIdentity,
    reverse_name: str | None,
    hostname: str,
    protocol: str,
    queue_id: str,
    user: str | None,
    tls: str | None = None,
    now: float | None = None,
) -> bytes:
    """The Received header (RFC 5321 §4.4), in Postfix's layout; `tls` is tls_clause()'s."""
    address = f"[{client.ip}]" if client.ip else "[unknown]"
    peer = f"{_clean(reverse_name)} {address}" if reverse_name else address
    import email.utils  # only a session that delivers pays for it

    lines = [f"Received: from {_clean(helo)} ({peer})"]
    if tls:
        lines.append(f"\t({tls})")
    if user:
        lines.append(f"\t(authenticated user {_clean(user)})")
    lines.append(f"\tby {hostname} (ofmipd) with {protocol} id {queue_id};")
    lines.append(f"\t{email.utils.formatdate(now, localtime=True)}")
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


_ALGORITHM_BITS: dict[str, int] = {}  # cipher name -> its algorithm's key size


def tls_clause(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """RFC 8314 §4.3 in Postfix's words: "using TLSv1.3 with cipher NAME (256/256 bits)";
    None without a TLS layer of our own (plain, or TLS ended by a terminator in front)."""
    cipher = ssl_object.cipher() if ssl_object is not None else None
    if ssl_object is None or cipher is None:
        return None
    name, protocol, bits = cipher
    if name not in _ALGORITHM_BITS:  # Python's cipher() gives the bits used, not the key's
        known = {c["name"]: c.get("alg_bits", bits) for c in ssl_object.context.get_ciphers()}
        _ALGORITHM_BITS[name] = known.get(name, bits)
    version = ssl_object.version() or protocol
    return (
        f"using {_clean(version)} with cipher {_clean(name)} ({bits}/{_ALGORITHM_BITS[name]} bits)"
    )


class Target(Protocol):
    name: str

    async def deliver(self, submission: Submission) -> str: ...


def exit_reply(profile: str, exit_code: int | None) -> str:
    """The reply for a failed injector; None (a signal, a timeout, no start) is 451."""
    if exit_code is None:
        return INJECTOR_FAILED
    return INJECTOR_EXITS[profile].get(exit_code, INJECTOR_FAILED)


def stderr_excerpt(stderr: bytes) -> str:
    """The first lines of an injector's stderr as one escaped log field ("" if none)."""
    # Split on LF only, so a lone CR shows escaped instead of starting a line.
    lines = [line.rstrip(b"\r") for line in stderr[:STDERR_BYTES].split(b"\n") if line.strip()]
    text = " | ".join(printable(line, STDERR_BYTES) for line in lines[:STDERR_LINES])
    cut = len(lines) > STDERR_LINES or len(stderr) > STDERR_BYTES
    return text + (" ..." if cut and text else "")


class SendmailTarget:
    """`PROGRAM -f SENDER -i -- RCPT...`, message on stdin; exit 0 means accepted.

    Any other status is answered as the `exits` profile says; the injector's stderr goes
    only to the log, never to the client.
    """

    name = "sendmail"

    def __init__(self, program: str, timeout: float, exits: str = "sysexits") -> None:
        self.argv = shlex.split(program)
        self.timeout = timeout
        self.exits = exits

    def describe(self) -> str:
        return f"{' '.join(self.argv)} (exit statuses: {self.exits})"

    async def deliver(self, submission: Submission) -> str:
        argv = [*self.argv, "-f", submission.sender or "<>", "-i", "--", *submission.recipients]
        env = environment(launcher_environment(submission.client), drop=LAUNCHER_VARIABLES)
        env["LOGIN"] = submission.user or ""
        result = await run_program(
            argv,
            stdin=submission.content,
            env=env,
            timeout=self.timeout,
            output_limit=STDERR_BYTES + 1,  # the rest is read and dropped, not kept
        )
        said = stderr_excerpt(result.stderr)
        if result.exit_code == 0:
            if said:
                log.warning("%s: injector %s accepted it; stderr: %s", submission.queue_id,
                            self.argv[0], said)  # fmt: skip
            return ACCEPTED.format(queue_id=submission.queue_id)
        reply = exit_reply(self.exits, result.exit_code)
        log.error(
            "%s: injector %s %s; message not accepted, replied %s%s",
            submission.queue_id,
            self.argv[0],
            result.describe(),
            reply[:9],
            f"; stderr: {said}" if said else "",
        )
        return reply


class MaildirTarget:
    """Maildir delivery: write tmp/, fsync, rename into new/, fsync the directory.

    Every step is relative to a directory descriptor opened with O_NOFOLLOW, so a symbolic
    link at the Maildir itself, at tmp/ or new/, or at a message's name is refused, never
    followed: ofmipd may run as root, and whoever plants a link chooses where it points.
    Directories it creates belong to `owner` (the -u user), who delivers after the drop.
    """

    name = "maildir"
    _counter = itertools.count()

    def __init__(self, path: str, owner: tuple[int, int] | None = None) -> None:
        self.path = os.path.abspath(path)  # a daemon may change directory later
        os.makedirs(os.path.dirname(self.path), exist_ok=True)  # the admin's own path
        made = _make_dir(self.path, None)
        root = _open_dir(self.path, None)
        try:
            if made:
                _give(root, owner)
            for sub in ("tmp", "new", "cur"):
                made = _make_dir(sub, root)
                fd = _open_dir(sub, root)
                try:
                    if made:
                        _give(fd, owner)
                finally:
                    os.close(fd)
        finally:
            os.close(root)

    def _unique(self) -> str:
        now = time.time()
        return (
            f"{int(now)}.M{int(now * 1e6) % 1000000}P{os.getpid()}"
            f"Q{next(self._counter)}R{os.urandom(4).hex()}.{socket.gethostname()}"
        )

    def _write(self, content: bytes) -> None:
        name = self._unique()
        root = _open_dir(self.path, None)
        try:
            tmp = _open_dir("tmp", root)
            try:
                new = _open_dir("new", root)
                try:
                    # Maildir holds LF-terminated messages, as local delivery agents write.
                    _write_new_file(name, tmp, content.replace(b"\r\n", b"\n"))
                    try:
                        os.rename(name, name, src_dir_fd=tmp, dst_dir_fd=new)  # renameat(2)
                    except OSError:
                        _remove(name, tmp)
                        raise
                    os.fsync(new)
                finally:
                    os.close(new)
            finally:
                os.close(tmp)
        finally:
            os.close(root)

    async def deliver(self, submission: Submission) -> str:
        try:
            await asyncio.to_thread(self._write, submission.content)
        except OSError as error:
            where = f"{error.filename}: " if error.filename and error.filename != self.path else ""
            log.error(
                "%s: maildir %s: %s%s; message not accepted",
                submission.queue_id,
                self.path,
                where,
                error.strerror,
            )
            return INJECTOR_FAILED
        return ACCEPTED.format(queue_id=submission.queue_id)


_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_dir(name: str, dir_fd: int | None) -> int:
    """A descriptor for the directory `name`; OSError naming it if it is anything else."""
    try:
        return os.open(name, _DIRECTORY, dir_fd=dir_fd)
    except OSError as error:
        if error.errno in (errno.ENOTDIR, errno.ELOOP):
            try:
                link = stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
            except OSError:
                link = False
            if link:
                raise OSError(errno.ELOOP, "is a symbolic link, refused", name) from None
        raise OSError(error.errno, error.strerror, name) from None


def _make_dir(name: str, dir_fd: int | None) -> bool:
    """mkdir, 0700; False if something is already there (_open_dir then judges it)."""
    try:
        os.mkdir(name, 0o700, dir_fd=dir_fd)
    except FileExistsError:
        return False
    except OSError as error:
        raise OSError(error.errno, error.strerror, name) from None
    return True


def _give(fd: int, owner: tuple[int, int] | None) -> None:
    """A directory we just made goes to the -u user, if we are root and it is not us."""
    if owner is not None and os.geteuid() == 0 and owner != (os.geteuid(), os.getegid()):
        os.fchown(fd, *owner)


def _write_new_file(name: str, dir_fd: int, data: bytes) -> None:
    # O_EXCL never opens an existing name, a symbolic link included.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    except OSError as error:
        raise OSError(error.errno, error.strerror, f"tmp/{name}") from None
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError:
        os.close(fd)
        _remove(name, dir_fd)
        raise
    os.close(fd)


def _remove(name: str, dir_fd: int) -> None:
    """Leave no half-written file in tmp/; the error that caused it is the one to report."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


class Delivery:
    def __init__(self, target: Target, throttle_script: str | None, timeout: float) -> None:
        self.target = target
        self.throttle_script = throttle_script
        self.timeout = timeout

    async def deliver(self, submission: Submission) -> str:
        return await self.throttle(submission) or await self.target.deliver(submission)

    async def throttle(self, submission: Submission) -> str | None:
        """THROTTLED if the throttle script refuses the user, else None. --relay calls
        this alone, before the final dot of a message it is streaming."""
        if not self.throttle_script:
            return None
        env = environment(launcher_environment(submission.client), drop=LAUNCHER_VARIABLES)
        result = await run_program(
            [self.throttle_script, submission.user or ""],
            stdin=None,
            env=env,
            timeout=self.timeout,
        )
        if result.exit_code == 0:
            return None
        log.info(
            "%s: throttle script refused user %s (%s)",
            submission.queue_id,
            printable(submission.user or "-"),
            result.describe(),
        )
        return THROTTLED
