"""Daemon mode: listening sockets, the connection limit, privilege drop, signals.

Sockets come from -p/-6 or from systemd (LISTEN_FDS). At most -C sessions run at
once; further clients wait in the kernel's accept queue rather than being
dropped, and one client address may hold at most --max-per-ip of them. SIGTERM
stops accepting and lets sessions finish; SIGHUP builds a new App from the
configuration (certificates, rules, backends) for new sessions; SIGUSR1 logs
what the connection limits hold.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable

from ofmipd import connection, identity, privileges
from ofmipd.app import App
from ofmipd.assemble import build_app
from ofmipd.config import Config, Listen
from ofmipd.errors import ConfigError, one_line
from ofmipd.smtp import SubmissionProtocol
from ofmipd.stdio import set_nodelay
from ofmipd.workers import HELD_SIGNALS

log = logging.getLogger("ofmipd")
GRACE_SECONDS = 30.0
ACCEPT_RETRY_SECONDS = 0.1
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


class Ticket:
    """One accepted connection's share of the limits: a slot of -C and, once the client
    is known, one count for its address. The connection's task releases it when the
    task ends, however it ends, so no path (failed handshake, refused PROXY header, rule
    deny, exception, cancellation) can keep a count."""

    __slots__ = ("table", "address", "released")

    def __init__(self, table: ConnectionTable) -> None:
        self.table = table
        self.address = ""
        self.released = False

    def count(self, address: str, limit: int) -> bool:
        per_ip = self.table.per_ip
        if per_ip[address] >= limit:
            return False
        per_ip[address] += 1
        self.address = address
        return True

    def release(self, _task: object = None) -> None:
        if self.released:
            return
        self.released = True
        table = self.table
        if self.address:
            table.per_ip[self.address] -= 1
            if table.per_ip[self.address] <= 0:
                del table.per_ip[self.address]
        table.open -= 1
        table.slots.release()


class ConnectionTable:
    """Connections open now: -C slots (further clients wait in the kernel's accept
    queue) and the count per client address (--max-per-ip)."""

    def __init__(self, connections: int) -> None:
        self.size = connections
        self.slots = asyncio.Semaphore(connections)
        self.per_ip: collections.Counter[str] = collections.Counter()
        self.open = 0

    def ticket(self) -> Ticket:
        """For a connection just accepted, holding the slot acquired for it."""
        self.open += 1
        return Ticket(self)

    def describe(self) -> str:
        busiest = ", ".join(f"{ip}={n}" for ip, n in self.per_ip.most_common(10))
        more = len(self.per_ip) - 10
        return (
            f"{self.open} of {self.size} connection slots in use; per client address: "
            + (busiest or "none")
            + (f" and {more} more" if more > 0 else "")
        )


class Daemon:
    def __init__(
        self, app: App, sockets: list[socket.socket], config_loader: Callable[[], Config]
    ) -> None:
        self.app = app
        self.sockets = sockets
        self.config_loader = config_loader
        self.table = ConnectionTable(app.config.connections)
        self.stopping = asyncio.Event()
        self.sessions: set[SubmissionProtocol] = set()
        self.session_ended = asyncio.Event()  # set whenever one ends; waiters clear it
        self.connections: set[asyncio.Task[None]] = set()

    async def accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        while not self.stopping.is_set():
            await self.table.slots.acquire()
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as error:
                self.table.slots.release()
                log.warning("accept failed: %s", error)
                # Most accept failures (EMFILE, ENFILE, ENOBUFS) pass when a connection
                # closes and frees its resources: retry then, or after a pause for the rest.
                await self.a_session_ends(within=ACCEPT_RETRY_SECONDS)
                continue
            except BaseException:
                self.table.slots.release()
                raise
            ticket = self.table.ticket()
            task = asyncio.create_task(self.serve(conn, ticket))
            task.add_done_callback(ticket.release)  # runs even if the task never started
            self.connections.add(task)
            task.add_done_callback(self.connections.discard)

    async def serve(self, conn: socket.socket, ticket: Ticket) -> None:
        set_nodelay(conn)
        app = self.app  # a connection keeps the App it started with across a reload
        client = connection.socket_client(app, conn)
        server = SubmissionProtocol(app, client, implicit_tls=app.implicit_tls_context is not None)
        self.sessions.add(server)
        try:
            await connection.serve(server, conn, lambda client: self.admit(ticket, client))
        finally:
            self.ended(server)
            ticket.release()  # now, rather than when the done callback runs

    def ended(self, server: SubmissionProtocol) -> None:
        self.sessions.discard(server)
        self.session_ended.set()

    async def drain(self, grace: float) -> None:
        """Let the sessions in progress finish, for at most `grace` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.sessions and loop.time() < deadline:
            await self.a_session_ends(within=deadline - loop.time())

    async def a_session_ends(self, within: float) -> None:
        """Return when a session ends, or after `within` seconds."""
        self.session_ended.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.session_ended.wait(), within)

    def admit(self, ticket: Ticket, client: identity.ClientIdentity) -> bool:
        """Simultaneous sessions per client address (IPv6: per /64): the socket peer's, or the one a
        trusted PROXY header names (the proxy's own address carries many clients and is
        not counted; so is an unknown client, for want of an address to count)."""
        ip = client.ip
        proxies = self.app.proxy_trust
        if not ip or (proxies is not None and proxies.contains(ip)):
            return True
        group = identity.address_group(ip)  # an IPv6 client by its /64
        if ticket.count(group, self.app.config.per_ip_limit):
            return True
        within = f" in {group}" if group != ip else ""
        log.warning("refused %s: %d sessions already%s", ip, self.table.per_ip[group], within)
        return False

    def reload(self) -> None:
        try:
            self.app = build_app(self.config_loader(), previous=self.app)
        except Exception as error:
            # Whatever went wrong (a bad file, or a value no check foresaw), the daemon
            # keeps serving with the App it has: one line, the traceback only in --debug.
            log.error("reload failed, keeping the running configuration: %s", one_line(error))
            if not isinstance(error, ConfigError):
                log.debug("reload failure", exc_info=error)
            return
        log.info("configuration reloaded")

    def status(self) -> None:
        """SIGUSR1: one line on what the connection limits hold now (for the admin, and
        for tests to see that every count came back)."""
        log.info("status: %s", self.table.describe())

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        loop.add_signal_handler(signal.SIGUSR1, self.status)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)  # now they can be handled
        accepting = [asyncio.create_task(self.accept_loop(s)) for s in self.sockets]
        names = ", ".join(str(s.getsockname()[:2]) for s in self.sockets)
        log.info("ofmipd ready on %s as %s", names, self.app.hostname)
        if self.app.relay is not None:  # says now whether the MTA answers, and warms the pool
            probe = asyncio.create_task(self.app.relay.probe())
        await self.stopping.wait()
        for task in accepting:
            task.cancel()
        for sock in self.sockets:
            sock.close()
        log.info("stopping: %d sessions in progress", len(self.sessions))
        for server in list(self.sessions):
            server.begin_shutdown()
        await self.drain(GRACE_SECONDS)
        for server in list(self.sessions):
            server.say_goodbye("421 4.3.2 Service shutting down, try again later")
        if self.app.relay is not None:
            probe.cancel()
            self.app.relay.close()
        if self.app.quotas is not None:
            await self.app.quotas.drain()  # the charges of the last messages
        if self.app.limiter is not None:
            await self.app.limiter.drain()  # the guesses given back by the last sessions
        log.info("stopped")


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
