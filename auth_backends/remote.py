"""A remote IMAP/POP3 login check's server: the -R URL or [[auth]] url, TLS, timeout, and
the connection that runs a login dialogue (auth_backends.imap, auth_backends.pop3).

With host 0.0.0.0 the server is chosen per client by tmda's ipauthmap (auth_backends.ipauthmap).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from auth_backends.ipauthmap import (
    MAP_HOST,
    TMDA_FALLBACK,
    IpAuthMap,
    default_map_path,
    parse_host,
)
from ofmipd.auth import Outcome, Secret, reject, tempfail
from ofmipd.errors import ConfigError
from ofmipd.identity import ClientIdentity
from ofmipd.logs import redact_url
from ofmipd.urls import split_url

if TYPE_CHECKING:
    from auth_backends.kinds import Settings

log = logging.getLogger("ofmipd.auth.remote")

# Longer than Dovecot's longest auth penalty (AUTH_PENALTY_MAX_SECS, 15 s) plus its
# auth_failure_delay (2 s), so a penalised login is answered, not timed out. Keep it
# below the chain's --auth-timeout (30 s), which would otherwise cut it short.
DEFAULT_TIMEOUT = 20.0
MAX_LINE = 16384  # longer server lines are garbage, not a login dialogue


class ProtocolError(Exception):
    """The server said something that is not the protocol; str() is safe to log."""


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class RemoteServer:
    """A parsed -R URL plus options: picks the server per client and talks to it."""

    def __init__(self, url: str, schemes: Mapping[str, tuple[int, bool]], **options: Any) -> None:
        where = f"-R {redact_url(url)}"
        parts = split_url(url, where)
        port = parts.port
        self.scheme = parts.scheme.lower()
        if self.scheme not in schemes:
            raise ConfigError(f"{where}: expected {' or '.join(s + '://' for s in schemes)}")
        if "@" in parts.netloc:
            # The client's own name and password are what is checked; one in the URL
            # would only be shown in --check-config and logs.
            raise ConfigError(f"{where}: no user or password in the URL")
        if not parts.hostname:
            raise ConfigError(f"{where}: no host")
        if parts.fragment or parts.path not in ("", "/"):
            raise ConfigError(f"{where}: expected {self.scheme}://HOST[:PORT]")
        default_port, self.tls = schemes[self.scheme]
        self.host = parts.hostname
        self.port = port or default_port
        self.timeout = float(options.get("timeout", DEFAULT_TIMEOUT))
        self.ssl_context = self._tls_context(options, where)
        self.ipauthmap: IpAuthMap | None = None
        self.fallback: str | None = None
        if self.host == MAP_HOST:
            self.ipauthmap = IpAuthMap(str(options.get("ipauthmap") or default_map_path()))
            fallback = str(options.get("fallback", TMDA_FALLBACK))
            if fallback.lower() not in ("", "none"):
                self.fallback = parse_host(fallback)
                if self.fallback is None:
                    raise ConfigError(f"{where}: fallback {fallback!r} is not a host or none")
        elif "ipauthmap" in options or "fallback" in options:
            raise ConfigError(f"{where}: ipauthmap and fallback need host {MAP_HOST}")
        self.target = f"{self.scheme}://{_bracket(self.host)}:{self.port}"
        if self.ipauthmap is not None:
            self.target += f" ipauthmap={self.ipauthmap.path}"

    def _tls_context(self, options: Mapping[str, Any], where: str) -> ssl.SSLContext | None:
        ca_file = options.get("ca_file")
        verify = options.get("verify", True)
        if not self.tls:
            if ca_file or "verify" in options:
                raise ConfigError(f"{where}: ca_file and verify apply to TLS URLs only")
            return None
        try:
            context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        except (OSError, ssl.SSLError) as error:
            raise ConfigError(f"{where}: ca_file {ca_file}: {error}") from None
        if not verify:  # for test servers with self-signed certificates only
            log.warning("%s: TLS certificate checks are off (verify = false)", where)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    @classmethod
    def from_settings(  # options (and the URL's query) checked by the declaration
        cls, settings: Settings, schemes: Mapping[str, tuple[int, bool]]
    ) -> RemoteServer:
        options = {k: v for k, v in settings.given.items() if k != "url"}
        return cls(settings["url"], schemes, **options)

    def destination(self, client: ClientIdentity) -> tuple[str, int]:
        """The server for this client; ConfigError when the map is broken or has no route."""
        if self.ipauthmap is None:
            return self.host, self.port
        entry = self.ipauthmap.lookup(client.local_ip)
        if entry is None:
            if self.fallback is None:
                raise ConfigError(
                    f"ipauthmap {self.ipauthmap.path}: no entry for local address "
                    f"{client.local_ip or '(unknown)'}"
                )
            entry = (self.fallback, None)
        host, port = entry
        return host, port or self.port

    async def converse(
        self,
        client: ClientIdentity,
        user: str,
        secret: Secret,
        dialogue: Callable[[Conversation, bytes, bytes], Awaitable[Outcome]],
        goodbye: bytes,
    ) -> Outcome:
        """Connect, run the login dialogue, say goodbye; every failure becomes an Outcome."""
        name, password = user.encode("utf-8"), secret.reveal()
        # The chain's door already refuses these; a line break would inject a command.
        if any(c in name for c in b"\r\n\0") or any(c in password for c in b"\r\n\0"):
            return reject("malformed credentials: control character")
        try:
            host, port = self.destination(client)
        except ConfigError as error:
            return tempfail(str(error))
        where = f"{_bracket(host)}:{port}"
        talk: Conversation | None = None
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(
                    host,
                    port,
                    ssl=self.ssl_context,
                    server_hostname=host if self.ssl_context else None,
                    limit=MAX_LINE,
                )
                talk = Conversation(reader, writer, client)
                outcome = await dialogue(talk, name, password)
            await talk.goodbye(goodbye)
            return Outcome(outcome.verdict, f"{where}: {outcome.reason}", outcome.user)
        except (OSError, EOFError, ProtocolError) as error:  # timeouts and TLS are OSErrors
            return tempfail(f"{where}: {self._explain(error)}")
        finally:
            if talk is not None:  # also when the chain cancels us at its own timeout
                await talk.close()

    def _explain(self, error: Exception) -> str:
        if isinstance(error, TimeoutError):
            return f"no answer within {self.timeout:g}s"
        if isinstance(error, ssl.SSLCertVerificationError):
            return f"TLS certificate not trusted: {error.verify_message}"
        if isinstance(error, ssl.SSLError):
            return f"TLS error {error.reason or type(error).__name__}"
        if isinstance(error, ConnectionRefusedError):
            return "connection refused"
        if isinstance(error, EOFError | ConnectionResetError | BrokenPipeError):
            return "server closed the connection"
        if isinstance(error, OSError):
            return error.strerror or type(error).__name__
        return str(error)  # ProtocolError: written to be safe to log


class Conversation:
    """Line-oriented I/O with a remote server (CRLF lines, bounded length), on behalf
    of one SMTP client (whose address a dialogue may pass on)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: ClientIdentity | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.client = client

    async def line(self) -> bytes:
        try:
            line = await self.reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise ProtocolError(f"server sent a line longer than {MAX_LINE} bytes") from None
        return line.rstrip(b"\r\n")

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def goodbye(self, command: bytes) -> None:
        # Polite LOGOUT/QUIT; the verdict is already made, so its failure changes nothing.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self.send(command)
                while await self.reader.read(4096):
                    pass

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self.writer.wait_closed()


def safe_text(data: bytes, limit: int = 80) -> str:
    """Printable ASCII of what a server sent BEFORE we sent a password (never after)."""
    return "".join(chr(c) if 32 <= c < 127 else "?" for c in data[:limit])
