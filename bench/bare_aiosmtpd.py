"""The ceiling: a bare aiosmtpd submission server with the same delivery as ofmipd.

    python bench/bare_aiosmtpd.py --users FILE (--maildir DIR | --sendmail PROG)
        [--listen HOST:PORT | -1] [--cert PEM --key PEM]

Authentication is aiosmtpd's synchronous authenticator callback on a dict loaded at
start-up, compared with hmac.compare_digest. Delivery mirrors ofmipd's: a Received
header, then either a fsynced Maildir file renamed into new/ (in a thread), or
`PROG -f SENDER -i -- RCPT...` with the message on stdin (exit 0 = 250). `-1` serves
one session on fd 0 (a socket from tcpserver or a socketpair).
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import hmac
import itertools
import os
import secrets
import shlex
import signal
import socket
import ssl
import sys
import time
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

HOSTNAME = "bare.bench"
_counter = itertools.count()


def load_users(path: str) -> dict[bytes, bytes]:
    users = {}
    with open(path, "rb") as f:
        for line in f:
            name, _, password = line.rstrip(b"\n").partition(b":")
            users[name] = password
    return users


class Authenticator:
    def __init__(self, users: dict[bytes, bytes]) -> None:
        self.users = users

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        stored = self.users.get(data.login, b"\0" * 16)  # compare even for unknown users
        ok = hmac.compare_digest(stored, data.password) and data.login in self.users
        return AuthResult(success=ok, handled=False, auth_data=data.login)


def maildir_write(path: str, content: bytes) -> None:
    now = time.time()
    name = (
        f"{int(now)}.M{int(now * 1e6) % 1000000}P{os.getpid()}Q{next(_counter)}"
        f"R{secrets.token_hex(4)}.{socket.gethostname()}"
    )
    tmp = os.path.join(path, "tmp", name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, content.replace(b"\r\n", b"\n"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(path, "new", name))
    dirfd = os.open(os.path.join(path, "new"), os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


class Handler:
    def __init__(self, maildir: str | None, sendmail: str | None) -> None:
        self.maildir = maildir
        self.sendmail = shlex.split(sendmail) if sendmail else None
        if maildir:
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(maildir, sub), exist_ok=True)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        queue_id = secrets.token_hex(6).upper()
        received = (
            f"Received: from {session.host_name} ([{(session.peer or ['?'])[0]}])\r\n"
            f"\tby {HOSTNAME} (bare aiosmtpd) with ESMTPA id {queue_id};\r\n"
            f"\t{email.utils.formatdate(localtime=True)}\r\n"
        ).encode()
        content = received + (envelope.original_content or b"")
        if self.maildir:
            await asyncio.to_thread(maildir_write, self.maildir, content)
        else:
            assert self.sendmail is not None
            argv = [*self.sendmail, "-f", envelope.mail_from or "<>", "-i", "--"]
            proc = await asyncio.create_subprocess_exec(
                *argv, *envelope.rcpt_tos, stdin=asyncio.subprocess.PIPE
            )
            await proc.communicate(content)
            if proc.returncode != 0:
                return "451 4.3.0 Temporary delivery failure"
        return f"250 2.0.0 OK: queued as {queue_id}"


def factory(args: argparse.Namespace) -> Any:
    users = Authenticator(load_users(args.users))
    handler = Handler(args.maildir, args.sendmail)
    tls = None
    if args.cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.cert, args.key)

    def make() -> SMTP:
        return SMTP(
            handler,
            hostname=HOSTNAME,
            ident="ESMTP bare",
            tls_context=tls,
            auth_require_tls=False,
            authenticator=users,
            decode_data=False,
        )

    return make


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    make = factory(args)
    if args.one:
        done = loop.create_future()

        def wrapped() -> SMTP:
            server = make()
            lost = server.connection_lost

            def connection_lost(error: Exception | None) -> None:
                lost(error)
                if not done.done():
                    done.set_result(None)

            server.connection_lost = connection_lost
            return server

        await loop.connect_accepted_socket(wrapped, socket.socket(fileno=os.dup(0)))
        await done
        return
    host, _, port = args.listen.rpartition(":")
    server = await loop.create_server(make, host, int(port), backlog=1024)
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)
    async with server:
        await stop


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:8025")
    parser.add_argument("-1", dest="one", action="store_true", help="one session on fd 0")
    parser.add_argument("--users", required=True, help="user:password lines")
    parser.add_argument("--maildir")
    parser.add_argument("--sendmail")
    parser.add_argument("--cert")
    parser.add_argument("--key")
    args = parser.parse_args()
    if bool(args.maildir) == bool(args.sendmail):
        parser.error("give exactly one of --maildir and --sendmail")
    try:
        asyncio.run(serve(args))
    except (ConnectionError, OSError):
        pass  # the client went away in one-session mode
    return 0


if __name__ == "__main__":
    sys.exit(main())
