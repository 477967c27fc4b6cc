"""The HTTP endpoint --metrics serves: a few threads at most, and no connection for long.

prometheus_client's own server (a ThreadingWSGIServer) starts a thread per connection and
waits on it forever: 200 idle connections held 200 threads. This one is the same WSGI app
(prometheus_client.make_wsgi_app: content negotiation, gzip, name[] filters) behind
  - a bound on connections served at once (MAX_CONNECTIONS); one over it hears
    `503 Service Unavailable` and is closed at once, so a flood costs no thread and a
    scraper sees why it failed (waiting instead would queue scrapes behind the flood);
  - a deadline per connection (DEADLINE seconds from accept, for the request to arrive and
    the reply to be written): a socket timeout bounds each read and write, and the accept loop
    shuts down connections past their deadline, so a request line sent a byte at a time is
    dropped too. A slot is free again after DEADLINE seconds at most.
It runs in one daemon thread, off the event loop, as before.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from socketserver import TCPServer, ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

log = logging.getLogger("ofmipd.metrics")

MAX_CONNECTIONS = 8  # one or two Prometheus servers scrape; more at once is not a scraper
DEADLINE = 5.0  # seconds from accept; a scrape of this registry takes milliseconds
BUSY = b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class _Handler(WSGIRequestHandler):
    def setup(self) -> None:
        # Each read and write waits this long at most (the deadline bounds their sum).
        self.request.settimeout(self.server.deadline)  # type: ignore[attr-defined]
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass  # no access log, as prometheus_client's server


class BoundedServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    block_on_close = False  # stop() must not wait for a slow client
    # socketserver's listen backlog of 5 makes a burst of connections wait for SYN
    # retransmits (1 s and more) before they can even be refused; the kernel queues these.
    request_queue_size = 64

    def __init__(
        self,
        address: tuple[str, int],
        app: Callable[..., Any],
        max_connections: int = MAX_CONNECTIONS,
        deadline: float = DEADLINE,
    ) -> None:
        family, _, _, _, sockaddr = socket.getaddrinfo(
            address[0], address[1], type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        self.address_family = family
        self.deadline = deadline
        self._slots = threading.BoundedSemaphore(max_connections)
        self._deadlines: dict[socket.socket, float] = {}
        self._lock = threading.Lock()  # a socket is shut down or closed, never both at once
        super().__init__((str(sockaddr[0]), int(sockaddr[1])), _Handler)
        self.set_app(app)

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks DNS for the host's FQDN (getfqdn): not needed here.
        TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])
        self.setup_environ()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.setblocking(False)
                request.send(BUSY)  # a fresh socket's buffer takes it whole
            except OSError:
                pass
            self.shutdown_request(request)
            return
        with self._lock:
            self._deadlines[request] = time.monotonic() + self.deadline
        try:
            super().process_request(request, client_address)  # starts the thread
        except BaseException:
            self._release(request)
            self.shutdown_request(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def _release(self, request: socket.socket) -> None:
        with self._lock:
            if self._deadlines.pop(request, None) is not None:
                self._slots.release()

    def shutdown_request(self, request: Any) -> None:
        with self._lock:  # not while service_actions shuts it down
            super().shutdown_request(request)

    def service_actions(self) -> None:
        """Called by serve_forever between accepts (every 0.5 s when idle): end
        connections past their deadline; their thread sees EOF or EPIPE and returns."""
        now = time.monotonic()
        with self._lock:
            for request, deadline in self._deadlines.items():
                if deadline <= now and request.fileno() != -1:
                    try:
                        request.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out or went away: not worth a traceback on stderr.
        log.debug("metrics: connection from %s ended early", client_address, exc_info=True)


def start(
    host: str,
    port: int,
    app: Callable[..., Any],
    max_connections: int = MAX_CONNECTIONS,
    deadline: float = DEADLINE,
) -> BoundedServer:
    """Bind HOST:PORT and serve `app` from a daemon thread; OSError if it cannot bind."""
    server = BoundedServer((host, port), app, max_connections, deadline)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
