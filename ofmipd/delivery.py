"""After DATA: the Received header, the throttle script, and the hand-off to an injector.

The reply is 250 only once the target has the message safely: the injector
exited 0, or the Maildir file was fsynced and renamed into new/. Anything else
is a 4xx, so the client keeps responsibility for the message.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import shlex
import socket
import time
from typing import NamedTuple, Protocol

from ofmipd.identity import LAUNCHER_VARIABLES, ClientIdentity, launcher_environment
from ofmipd.logs import printable
from ofmipd.proc import environment, run_program

log = logging.getLogger("ofmipd.delivery")

ACCEPTED = "250 2.0.0 OK: queued as {queue_id}"
INJECTOR_FAILED = "451 4.3.0 Temporary delivery failure, try again later"
THROTTLED = "450 4.7.1 Message refused by the sending limit, try again later"


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
    now: float | None = None,
) -> bytes:
    address = f"[{client.ip}]" if client.ip else "[unknown]"
    peer = f"{_clean(reverse_name)} {address}" if reverse_name else address
    import email.utils  # only a session that delivers pays for it

    lines = [f"Received: from {_clean(helo)} ({peer})"]
    if user:
        lines.append(f"\t(authenticated user {_clean(user)})")
    lines.append(f"\tby {hostname} (ofmipd) with {protocol} id {queue_id};")
    lines.append(f"\t{email.utils.formatdate(now, localtime=True)}")
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


class Target(Protocol):
    name: str

    async def deliver(self, submission: Submission) -> str: ...


class SendmailTarget:
    """`PROGRAM -f SENDER -i -- RCPT...`, message on stdin; exit 0 means accepted."""

    name = "sendmail"

    def __init__(self, program: str, timeout: float) -> None:
        self.argv = shlex.split(program)
        self.timeout = timeout

    async def deliver(self, submission: Submission) -> str:
        argv = [*self.argv, "-f", submission.sender or "<>", "-i", "--", *submission.recipients]
        env = environment(launcher_environment(submission.client), drop=LAUNCHER_VARIABLES)
        env["LOGIN"] = submission.user or ""
        result = await run_program(argv, stdin=submission.content, env=env, timeout=self.timeout)
        if result.exit_code == 0:
            return ACCEPTED.format(queue_id=submission.queue_id)
        log.error(
            "%s: injector %s %s; message not accepted",
            submission.queue_id,
            self.argv[0],
            result.describe(),
        )
        return INJECTOR_FAILED


class MaildirTarget:
    """Maildir delivery: write tmp/, fsync, rename into new/, fsync the directory."""

    name = "maildir"
    _counter = itertools.count()

    def __init__(self, path: str) -> None:
        self.path = path
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)

    def _unique(self) -> str:
        now = time.time()
        return (
            f"{int(now)}.M{int(now * 1e6) % 1000000}P{os.getpid()}"
            f"Q{next(self._counter)}R{os.urandom(4).hex()}.{socket.gethostname()}"
        )

    def _write(self, content: bytes) -> None:
        name = self._unique()
        tmp = os.path.join(self.path, "tmp", name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Maildir holds LF-terminated messages, as local delivery agents write them.
            os.write(fd, content.replace(b"\r\n", b"\n"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(self.path, "new", name))
        dirfd = os.open(os.path.join(self.path, "new"), os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    async def deliver(self, submission: Submission) -> str:
        try:
            await asyncio.to_thread(self._write, submission.content)
        except OSError as error:
            log.error("%s: maildir %s: %s", submission.queue_id, self.path, error.strerror)
            return INJECTOR_FAILED
        return ACCEPTED.format(queue_id=submission.queue_id)


class Delivery:
    def __init__(self, target: Target, throttle_script: str | None, timeout: float) -> None:
        self.target = target
        self.throttle_script = throttle_script
        self.timeout = timeout

    async def deliver(self, submission: Submission) -> str:
        if self.throttle_script:
            env = environment(launcher_environment(submission.client), drop=LAUNCHER_VARIABLES)
            result = await run_program(
                [self.throttle_script, submission.user or ""],
                stdin=None,
                env=env,
                timeout=self.timeout,
            )
            if result.exit_code != 0:
                log.info(
                    "%s: throttle script refused user %s (%s)",
                    submission.queue_id,
                    printable(submission.user or "-"),
                    result.describe(),
                )
                return THROTTLED
        return await self.target.deliver(submission)
