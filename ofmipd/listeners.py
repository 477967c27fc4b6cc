"""Daemon mode: listening sockets, the connection limit, privilege drop, signals.

Sockets come from -p/-6 or from systemd (LISTEN_FDS). At most -C sessions run at
once; further clients wait in the kernel's accept queue rather than being
dropped. SIGTERM stops accepting and lets sessions finish; SIGHUP builds a new
App from the configuration (certificates, rules, backends) for new sessions.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable

from ofmipd import identity, privileges
from ofmipd.assemble import App, build_app
from ofmipd.config import Config, Listen
from ofmipd.errors import ConfigError
from ofmipd.smtp import SubmissionServer
from ofmipd.stdio import set_nodelay

log = logging.getLogger("ofmipd")
GRACE_SECONDS = 30.0
SD_LISTEN_FDS_START = 3


def systemd_sockets() -> list[socket.socket]:
    """Sockets passed by systemd socket activation (the sd_listen_fds convention)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    return [
        socket.socket(fileno=fd) for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)
    ]


def bind(listen: Listen) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((listen.host, listen.port))
        sock.listen(128)
    except OSError as error:
        sock.close()
        raise ConfigError(f"cannot listen on {listen}: {error.strerror}") from None
    return sock


def daemonize() -> None:
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    os.close(devnull)


class Daemon:
    def __init__(
        self, app: App, sockets: list[socket.socket], config_loader: Callable[[], Config]
    ) -> None:
        self.app = app
        self.sockets = sockets
        self.config_loader = config_loader
        self.slots = asyncio.Semaphore(app.config.connections)
        self.stopping = asyncio.Event()
        self.sessions: set[SubmissionServer] = set()
        self.handshakes: set[asyncio.Task[None]] = set()
        self.per_ip: collections.Counter[str] = collections.Counter()

    def identify(self, transport: asyncio.BaseTransport) -> identity.ClientIdentity:
        client = identity.from_socket(
            transport.get_extra_info("peername"), transport.get_extra_info("sockname")
        )
        return client.with_changes(tls_in_front=self.app.config.tls_in_front)

    def _release(self) -> None:
        self.slots.release()

    async def accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        while not self.stopping.is_set():
            await self.slots.acquire()
            try:
                conn, _ = await loop.sock_accept(sock)
            except asyncio.CancelledError:
                self.slots.release()
                raise
            except OSError as error:
                self.slots.release()
                log.warning("accept failed: %s", error)
                await asyncio.sleep(0.1)
                continue
            if not self.admit(conn):
                continue
            task = asyncio.create_task(self.start_session(conn))
            self.handshakes.add(task)
            task.add_done_callback(self.handshakes.discard)

    def admit(self, conn: socket.socket) -> bool:
        """Simultaneous sessions per transport peer. A trusted PROXY sender carries many
        clients, so it is exempt; limit clients per address in the proxy itself."""
        try:
            ip = identity.normalise_ip(conn.getpeername()[0])
        except (OSError, IndexError):
            ip = ""
        trusted_proxy = self.app.proxy_trust is not None and self.app.proxy_trust.contains(ip)
        if ip and not trusted_proxy and self.per_ip[ip] >= self.app.config.max_per_ip:
            log.warning("refused %s: %d sessions already", ip, self.per_ip[ip])
            try:
                conn.send(b"421 4.7.0 Too many connections from your address\r\n")
            except OSError:
                pass
            conn.close()
            self.slots.release()
            return False
        return True

    async def start_session(self, conn: socket.socket) -> None:
        set_nodelay(conn)
        app = self.app  # a session keeps the App it started with across a reload
        loop = asyncio.get_running_loop()
        created: list[SubmissionServer] = []

        def factory() -> SubmissionServer:
            server = SubmissionServer(
                app, self.identify, implicit_tls=app.implicit_tls_context is not None
            )
            self.sessions.add(server)
            try:
                ip = identity.normalise_ip(conn.getpeername()[0])
            except (OSError, IndexError):
                ip = ""
            self.per_ip[ip] += 1

            def ended() -> None:
                self.sessions.discard(server)
                self.per_ip[ip] -= 1
                if self.per_ip[ip] <= 0:
                    del self.per_ip[ip]
                self.slots.release()

            server.on_end = ended
            created.append(server)
            return server

        try:
            await loop.connect_accepted_socket(
                factory,
                conn,
                ssl=app.implicit_tls_context,
                ssl_handshake_timeout=30 if app.implicit_tls_context else None,
            )
        except Exception as error:
            if isinstance(error, OSError | TimeoutError):
                log.info("connection dropped before the session began: %s", error)
            else:
                log.error("cannot start a session", exc_info=error)
            conn.close()
            for server in created:  # a failed TLS handshake never reaches connection_made
                self.sessions.discard(server)
            self.slots.release()

    def reload(self) -> None:
        try:
            self.app = build_app(self.config_loader(), previous=self.app)
        except ConfigError as error:
            log.error("reload failed, keeping the running configuration: %s", error)
            return
        log.info("configuration reloaded")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)  # now they can be handled
        accepting = [asyncio.create_task(self.accept_loop(s)) for s in self.sockets]
        names = ", ".join(str(s.getsockname()[:2]) for s in self.sockets)
        log.info("ofmipd ready on %s as %s", names, self.app.hostname)
        await self.stopping.wait()
        for task in accepting:
            task.cancel()
        for sock in self.sockets:
            sock.close()
        log.info("stopping: %d sessions in progress", len(self.sessions))
        for server in list(self.sessions):
            server.begin_shutdown()
        deadline = loop.time() + GRACE_SECONDS
        while self.sessions and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for server in list(self.sessions):
            server.say_goodbye("421 4.3.2 Service shutting down, try again later")
        log.info("stopped")


# A stop or reload that arrives between binding the sockets (clients can connect from
# then on) and installing the handlers waits, blocked, instead of killing the process.
HELD_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def serve_daemon(app: App, config_loader: Callable[[], Config]) -> int:
    from ofmipd import logs

    config = app.config
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    try:
        sockets = systemd_sockets() or [bind(listen) for listen in config.listeners]
        if config.username:
            privileges.drop(config.username)
    except ConfigError as error:
        print(f"ofmipd: {error}", file=sys.stderr)
        return 2
    if config.background:
        daemonize()
    if config.metrics:
        from ofmipd.metrics import serve

        try:
            app.metrics = serve(config.metrics)
        except ConfigError as error:
            print(f"ofmipd: {error}", file=sys.stderr)
            return 2
    logs.setup(
        debug=config.debug, syslog=config.syslog or config.background, stderr=not config.background
    )
    if config.workers > 1:
        from ofmipd.workers import run_workers

        return run_workers(
            config.workers, lambda: asyncio.run(Daemon(app, sockets, config_loader).run())
        )
    asyncio.run(Daemon(app, sockets, config_loader).run())
    return 0
