"""Stand-in IMAP/POP3 servers that misbehave on demand, for the remote-store tests.

A stand-in runs a script coroutine per connection, in the test's own event loop, and
records every byte the client sent, so a test can say what never left ofmipd:

    async def script(peer: Peer) -> None:
        await peer.send(b"* OK hello\\r\\n")
        await peer.line()

    async with Standin(script) as server:
        ...  # server.port, server.received
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

from auth_backends import BackendSpec, create, kind_for_url
from ofmipd.auth import Outcome, Secret
from ofmipd.identity import ClientIdentity


class Peer:
    """One connection to the stand-in, seen from the server's side."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, received: bytearray
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.received = received

    async def line(self) -> bytes:
        data = await self.reader.readuntil(b"\n")
        self.received += data
        return data.rstrip(b"\r\n")

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def start_tls(self, context: ssl.SSLContext) -> None:
        await self.writer.start_tls(context)


Script = Callable[[Peer], Awaitable[None]]


class Standin:
    """A listening stand-in server; `received` holds what all its clients sent."""

    def __init__(self, script: Script, host: str = "127.0.0.1") -> None:
        self.script = script
        self.host = host
        self.port = 0
        self.received = bytearray()
        self.server: asyncio.Server | None = None
        self.connections: dict[asyncio.Task, asyncio.StreamWriter] = {}

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections[task] = writer
        peer = Peer(reader, writer, self.received)
        with contextlib.suppress(Exception):  # the client hanging up ends the script
            await self.script(peer)
            async with asyncio.timeout(0.5):  # whatever the client says after the script
                while data := await reader.read(4096):
                    self.received += data
        writer.close()

    async def __aenter__(self) -> Standin:
        self.server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        # Scripts that never end (floods) end when their connection does; a task left to
        # asyncio.run's cancelling would be logged as an error by asyncio's streams.
        for writer in self.connections.values():
            writer.transport.abort()
        if self.connections:
            await asyncio.wait(self.connections, timeout=2)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await self.server.wait_closed()

    def url(self, scheme: str, query: str = "") -> str:
        return f"{scheme}://{self.host}:{self.port}" + (f"?{query}" if query else "")


def server_tls_context(directory: Path, names: tuple[str, ...] = ("127.0.0.1",)) -> ssl.SSLContext:
    """A server-side context with a fresh self-signed certificate (directory/cert.pem)."""
    from tests.dovecot_server import make_certificate

    cert = make_certificate(directory, names)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, directory / "key.pem")
    return context


async def verify_url(url: str, user: str, password: str, client: ClientIdentity) -> Outcome:
    backend = create(BackendSpec(kind=kind_for_url(url), arg=url))
    return await backend.verify(user, Secret(password.encode()), client)
