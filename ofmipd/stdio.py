"""One-session mode: a single SMTP session on fd 0 and fd 1.

fd 0 may be a TCP socket (tcpserver, inetd, systemd Accept=yes), a socketpair
(stunnel's exec) or a pipe with fd 1 another pipe. All three become one asyncio
transport, so the session code is the same as in daemon mode.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import sys
from typing import Any, NoReturn

from ofmipd import connection, identity
from ofmipd.app import App
from ofmipd.smtp import SubmissionProtocol


def set_nodelay(sock: socket.socket) -> None:
    """Replies go out at once: without this, multi-line replies wait on delayed ACKs
    (asyncio sets it only for sockets created with proto=IPPROTO_TCP). The daemon
    uses it too; it lives here so one-session mode need not import ofmipd.listeners."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class PipePair(asyncio.Transport):
    """Two pipes (read fd 0, write fd 1) presented as one duplex transport.

    set_protocol() lets STARTTLS put an SSL layer on top, as it does on sockets.
    """

    def __init__(self) -> None:
        super().__init__()
        self._protocol: Any = None
        self._reader: Any = None
        self._writer: Any = None
        self._closed = False

    async def connect(self, protocol: asyncio.Protocol) -> None:
        loop = asyncio.get_running_loop()
        self._protocol = protocol
        pair = self

        class ReadSide(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                pair._protocol.data_received(data)

            def eof_received(self) -> bool | None:
                return pair._protocol.eof_received()

            def connection_lost(self, exc: Exception | None) -> None:
                pair._lost(exc)

        class WriteSide(asyncio.Protocol):
            def pause_writing(self) -> None:
                pair._protocol.pause_writing()

            def resume_writing(self) -> None:
                pair._protocol.resume_writing()

            def connection_lost(self, exc: Exception | None) -> None:
                pair._lost(exc)

        self._writer, _ = await loop.connect_write_pipe(
            WriteSide, os.fdopen(os.dup(1), "wb", buffering=0)
        )
        self._reader, _ = await loop.connect_read_pipe(
            ReadSide, os.fdopen(os.dup(0), "rb", buffering=0)
        )
        protocol.connection_made(self)

    def _lost(self, exc: Exception | None) -> None:
        if not self._closed:
            self._closed = True
            self._reader.close()
            self._writer.close()
            self._protocol.connection_lost(exc)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closed:
            self._writer.write(data)

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        if not self._closed:
            asyncio.get_running_loop().call_soon(self._lost, None)
            self._writer.close()

    def abort(self) -> None:
        self.close()

    def get_write_buffer_size(self) -> int:
        return int(self._writer.get_write_buffer_size())

    def pause_reading(self) -> None:
        self._reader.pause_reading()

    def resume_reading(self) -> None:
        self._reader.resume_reading()

    def is_reading(self) -> bool:
        return bool(self._reader.is_reading())

    def set_protocol(self, protocol: Any) -> None:
        self._protocol = protocol

    def get_protocol(self) -> Any:
        return self._protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def run_session(app: App) -> None:
    try:
        await _serve(app)
    finally:
        if app.quotas is not None:
            await app.quotas.drain()  # a message's charge must land before the process ends
        if app.limiter is not None:
            await app.limiter.drain()  # and a guess given back must be back
        if app.relay is not None:
            app.relay.close()  # QUIT to the MTA, as a daemon says it when stopping
            await asyncio.sleep(0)  # the loop closes the sockets it flushed


async def _serve(app: App) -> None:
    implicit_tls = app.implicit_tls_context is not None
    if stat.S_ISSOCK(os.fstat(0).st_mode):
        sock = socket.socket(fileno=os.dup(0))
        set_nodelay(sock)
        client = connection.socket_client(app, sock, os.environ)
        await connection.serve(SubmissionProtocol(app, client, implicit_tls=implicit_tls), sock)
        return
    # Pipes: no IP peer, so the launcher's environment alone names the client.
    client = identity.from_environment(os.environ, identity.ClientIdentity(ip=""))
    client = identity.with_tls_in_front(client, app.tls_terminators, ip_peer=False)
    server = SubmissionProtocol(app, client, implicit_tls=implicit_tls)
    await PipePair().connect(server)
    await server.ended


def stderr_is_the_connection() -> bool:
    """True when fd 2 is the client's channel, as xinetd and stunnel's exec set it up."""
    try:
        err = os.fstat(2)
        return any(
            (err.st_dev, err.st_ino) == (other.st_dev, other.st_ino)
            for other in (os.fstat(0), os.fstat(1))
        )
    except OSError:
        return False


def pollable(fd: int) -> bool:
    """Whether the event loop can wait on fd (regular files and /dev/null cannot)."""
    import select

    poller = select.epoll()
    try:
        poller.register(fd, select.EPOLLIN if fd == 0 else select.EPOLLOUT)
    except OSError:
        return False
    finally:
        poller.close()
    return True


def serve_one_session(app: App) -> int:
    from ofmipd import logs

    if app.config.username:
        # Before the first client byte: the App (TLS key, authfile) was built as root.
        from ofmipd import privileges
        from ofmipd.errors import ConfigError

        try:
            privileges.drop(app.config.username)
        except ConfigError as error:
            print(f"ofmipd: {error}", file=sys.stderr)
            return 2
    if app.implicit_tls_context is not None and not stat.S_ISSOCK(os.fstat(0).st_mode):
        print(
            "ofmipd: --ssl with -1 needs stdin to be a socket (use stunnel for pipes)",
            file=sys.stderr,
        )
        return 2
    for fd, name in ((0, "stdin"), (1, "stdout")):
        if not pollable(fd):
            print(
                f"ofmipd: -1 needs {name} to be a socket or a pipe (launch it from inetd, "
                "tcpserver, stunnel or systemd, or pipe to it)",
                file=sys.stderr,
            )
            return 2

    stderr = not app.config.syslog  # --syslog: one destination, not two
    if stderr_is_the_connection():
        # A log line (ours, or a checkpassword or sendmail program's) would reach the
        # client as a bogus SMTP reply, and bypass stunnel's TLS: send them to syslog.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        stderr = False
    logs.setup(debug=app.config.debug, syslog=app.config.syslog or not stderr, stderr=stderr)
    try:
        asyncio.run(run_session(app))
    except (ConnectionError, OSError):
        return 0  # the client went away; nothing to report to a launcher
    return 0


def exit_without_teardown(code: int) -> NoReturn:
    """End a one-session process without the interpreter's teardown, once logs are flushed.

    That teardown (freeing every module and object, OpenSSL's clean-up, joining idle
    offload threads) took ~40 ms of CPU here, about as much as a short session, and under
    tcpserver or inetd every connection pays it. Nothing is left for it to do: a message
    is delivered (or refused) before its reply is sent, and the session has ended.
    """
    logging.shutdown()  # flush and close the log handlers, as exit would
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
