"""One client socket from accept to end: PROXY header, implicit TLS, then the SMTP session.

Both launchers hand a connected socket here (the daemon for each accept, `ofmipd -1`
when stdin is a socket). The order is the wire's: a PROXY header comes in the clear
before anything else, so it is read from the raw socket, exactly its bytes, before
any TLS handshake (implicit TLS behind haproxy's send-proxy-v2 needs that). The
header, the handshake and the wait for EHLO share one deadline (--ehlo-timeout),
which the session holds. serve() returns only once the session's end line is out.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from ofmipd import identity
from ofmipd.identity import ClientIdentity
from ofmipd.logs import printable
from ofmipd.smtp import SubmissionProtocol

if TYPE_CHECKING:
    from ofmipd.app import App

log = logging.getLogger("ofmipd.smtp")

TOO_MANY = b"421 4.7.0 Too many connections from your address\r\n"


def socket_client(
    app: App, sock: socket.socket, env: Mapping[str, str] | None = None
) -> ClientIdentity:
    """The client as the socket (and, in one-session mode, the launcher's environment)
    describes it, with --tls-in-front decided from the transport peer."""
    try:
        peer: object = sock.getpeername()
    except OSError:  # gone already; the session will find out
        peer = None
    try:
        local: object = sock.getsockname()
    except OSError:
        local = None
    client = identity.from_socket(peer, local)
    if env is not None:
        client = identity.from_environment(env, client)
    ip_peer = sock.family in (socket.AF_INET, socket.AF_INET6)
    return identity.with_tls_in_front(client, app.tls_terminators, ip_peer=ip_peer)


async def serve(
    server: SubmissionProtocol,
    sock: socket.socket,
    admit: Callable[[ClientIdentity], bool] | None = None,
) -> None:
    """Run one connection until it has ended, whichever way that happens.

    `admit` sees the client once it is known (after a PROXY header, if any) and may
    refuse it (the daemon's per-address limit); a refusal is its caller's to log.
    """
    app = server.app
    loop = asyncio.get_running_loop()
    transport: asyncio.Transport | None = None
    sock.setblocking(False)
    try:
        proxies = app.proxy_trust
        if proxies is not None and proxies.contains(server.client.peer_ip):
            if not await _read_proxy_header(server, sock):
                _discard_input(sock)
                return
        if admit is not None and not admit(server.client):
            if app.implicit_tls_context is None:  # a TLS client would take it for garbage
                try:
                    sock.send(TOO_MANY)
                except OSError:
                    pass
            _discard_input(sock)
            return
        context = app.implicit_tls_context
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: server,
                sock,
                ssl=context,
                ssl_handshake_timeout=max(server.greeting_time_left(), 0.001) if context else None,
            )
        except (OSError, EOFError) as error:  # ssl.SSLError is an OSError
            if context is None:
                server.end_before_session("dropped", type(error).__name__)
                return
            from ofmipd.tls import handshake_failure

            timed_out = server.greeting_time_left() <= 0
            server.end_before_session("tls-failed", handshake_failure(error, timed_out=timed_out))
            return
        await server.ended
    finally:
        if transport is None:
            sock.close()
        elif not transport.is_closing():  # cancelled (shutdown): the session ends here
            transport.abort()


async def _read_proxy_header(server: SubmissionProtocol, sock: socket.socket) -> bool:
    from ofmipd.proxy import ProxyError, SocketReader, apply_proxy, read_proxy_header

    budget = min(server.app.proxy_timeout, server.greeting_time_left())
    header = await read_proxy_header(SocketReader(sock), budget)
    if isinstance(header, ProxyError):
        log.warning(
            "session %s: PROXY header from %s refused: %s",
            server.session_id,
            server.client.peer_ip or "unknown",
            printable(header.reason),
        )
        server.end_before_session("dropped")
        return False
    server.client = apply_proxy(server.client, header)
    return True


def _discard_input(sock: socket.socket) -> None:
    """Read what the client has sent so far, so that closing sends a FIN, not a reset
    that could destroy the last reply before the client reads it (RFC 1122 4.2.2.13)."""
    try:
        for _ in range(16):  # bounded: a client streaming data gets its reset
            if not sock.recv(65536):
                return
    except OSError:  # BlockingIOError: nothing more for now
        pass
