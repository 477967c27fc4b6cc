"""A remote IMAP/POP3 login check's server: the -R URL or [[auth]] url, TLS, timeout, and
the connection that runs a login dialogue (auth_backends.imap, auth_backends.pop3).

With host 0.0.0.0 the server is chosen per client by tmda's ipauthmap (auth_backends.ipauthmap).

Transport security (`tls`, for imap://, pop3:// and apop://; imaps:// and pop3s:// are TLS
from the first byte and take no `tls`):
  auto      STARTTLS/STLS whenever the server offers it, with the certificate and host
            name checks of imaps://. Not offered: the password goes in cleartext only when
            the server's address is loopback (127.0.0.0/8, ::1); otherwise TEMPFAIL, and
            the password is not sent.
  starttls  the upgrade is required, on loopback too.
  none      never upgrade: passwords cross the network in cleartext (a WARNING at start).
A failed upgrade or an untrusted certificate is TEMPFAIL before any password is sent.

A hostile server is bounded per dialogue (Conversation): MAX_BYTES received, MAX_LINES
lines, MAX_LITERALS IMAP literals, and `timeout` seconds of wall time for everything from
the connect to the verdict (TLS handshakes and literals included). Each is a TEMPFAIL that
names the bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
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
# What one login dialogue may receive: a real server's greeting, capabilities and verdict
# are a few hundred bytes and lines.
MAX_BYTES = 256 * 1024
MAX_LINES = 1000
MAX_LITERALS = 100
TLS_MODES = ("auto", "starttls", "none")


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
        default_port, implicit = schemes[self.scheme]
        self.host = parts.hostname
        self.port = port or default_port
        self.timeout = float(options.get("timeout", DEFAULT_TIMEOUT))
        self.tls = self._tls_mode(options, implicit, where)  # "implicit" or one of TLS_MODES
        self._context: ssl.SSLContext | None = None
        self._verify = bool(options.get("verify", True))
        self._ca_file = options.get("ca_file")
        self._check_tls_options(options, where)
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
        if self.tls in ("starttls", "none"):  # auto is the default, implicit is the scheme
            self.target += f" tls={self.tls}"
        if self.ipauthmap is not None:
            self.target += f" ipauthmap={self.ipauthmap.path}"
        self.transport = self._transport()

    def _transport(self) -> str:
        """How passwords travel, for --check-config."""
        if self.tls == "implicit":
            return "passwords over TLS"
        if self.tls == "none":
            return "passwords in CLEARTEXT"
        if self.tls == "starttls":
            return "passwords over STARTTLS, required at login"
        if self.ipauthmap is not None:
            return "passwords over STARTTLS; in cleartext only to a loopback server"
        if self.host.lower() == "localhost" or is_loopback(self.host):
            return "passwords over STARTTLS if offered, else in cleartext to loopback"
        return "passwords over STARTTLS, required at login"

    def _tls_mode(self, options: Mapping[str, Any], implicit: bool, where: str) -> str:
        if implicit:
            if "tls" in options:  # nothing to choose: the scheme says TLS from the first byte
                raise ConfigError(
                    f"{where}: {self.scheme}:// is TLS from the start; "
                    "tls applies to imap://, pop3:// and apop://"
                )
            return "implicit"
        mode = str(options.get("tls", "auto")).lower()
        if mode not in TLS_MODES:
            raise ConfigError(f"{where}: tls must be auto, starttls or none, not {mode!r}")
        return mode

    def _check_tls_options(self, options: Mapping[str, Any], where: str) -> None:
        if self.tls == "none":
            if self._ca_file or "verify" in options:
                raise ConfigError(f"{where}: ca_file and verify apply to TLS, not tls=none")
            log.warning("%s: tls=none: users' passwords go to the server in cleartext", where)
            return
        if not self._verify:  # for test servers with self-signed certificates only
            log.warning("%s: TLS certificate checks are off (verify = false)", where)
        if self._ca_file:
            self.tls_context(where)  # a bad CA file is a configuration error now, not later

    def tls_context(self, where: str = "") -> ssl.SSLContext:
        """Built on first use: the system's CA store costs ~50 ms, which an `ofmipd -1`
        with a TLS or STARTTLS URL should not pay at every start, before any AUTH."""
        if self._context is None:
            ca_file = self._ca_file
            try:
                context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            except (OSError, ssl.SSLError) as error:
                raise ConfigError(f"{where or self.target}: ca_file {ca_file}: {error}") from None
            if not self._verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._context = context
        return self._context

    async def _loaded_context(self) -> ssl.SSLContext:
        if self._context is not None:
            return self._context
        return await asyncio.to_thread(self.tls_context)

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
            # Loading the CA store blocks (~50 ms): the first login's thread does it.
            context = None if self.tls == "none" else await self._loaded_context()
        except ConfigError as error:  # the CA store went missing since start-up
            return tempfail(str(error))
        try:
            async with asyncio.timeout(self.timeout):  # the whole dialogue, TLS included
                implicit = self.tls == "implicit"
                reader, writer = await asyncio.open_connection(
                    host,
                    port,
                    ssl=context if implicit else None,
                    server_hostname=host if implicit else None,
                    limit=MAX_LINE,
                )
                talk = Conversation(reader, writer, client)
                talk.prepare_tls(self.tls, context, host)
                outcome = await dialogue(talk, name, password)
            await talk.goodbye(goodbye)
            return Outcome(outcome.verdict, f"{where}: {outcome.reason}", outcome.user)
        except (OSError, EOFError, ProtocolError) as error:  # timeouts and TLS are OSErrors
            return tempfail(f"{where}: {self._explain(error, talk)}")
        finally:
            if talk is not None:  # also when the chain cancels us at its own timeout
                await talk.close()

    def _explain(self, error: Exception, talk: Conversation | None) -> str:
        if isinstance(error, TimeoutError):
            if talk is None or not talk.received:
                return f"no answer within {self.timeout:g}s"
            return (
                f"login dialogue unfinished after {self.timeout:g}s (timeout), "
                f"{talk.received} bytes received"
            )
        if isinstance(error, ssl.SSLCertVerificationError):
            hint = "; ca_file names a CA to trust, tls=none skips STARTTLS"
            # A local Dovecot's self-signed certificate is the common case after upgrading.
            return f"TLS certificate not trusted: {error.verify_message}" + (
                hint if self.tls == "auto" else ""
            )
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
    of one SMTP client (whose address a dialogue may pass on). It counts what the server
    sends against the per-dialogue bounds, and knows whether the transport is secure."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: ClientIdentity | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.client = client
        self.received = 0  # bytes, lines and literals so far: the hostile-server bounds
        self.lines = 0
        self.literals = 0
        self.mode = "none"  # TLS: "implicit" or one of TLS_MODES
        self.secure = False
        self._context: ssl.SSLContext | None = None
        self._host = ""

    def prepare_tls(self, mode: str, context: ssl.SSLContext | None, host: str) -> None:
        self.mode = mode
        self.secure = mode == "implicit"
        self._context = context
        self._host = host

    def should_upgrade(self, offered: bool, command: str) -> bool:
        """Whether to STARTTLS/STLS now, before any password. Raises ProtocolError (a
        TEMPFAIL) when the password must not go out: TLS required but not offered."""
        if self.secure or self.mode == "none":
            return False
        if offered:
            return True
        if self.mode == "starttls":
            raise ProtocolError(f"server does not offer {command}, and tls=starttls requires it")
        if self.peer_is_loopback():
            return False
        raise ProtocolError(
            f"server does not offer {command}; the password is not sent in cleartext to a "
            "non-loopback address (add tls=none to allow it)"
        )

    def peer_is_loopback(self) -> bool:
        """The address actually connected to, whatever name led there."""
        peer = self.writer.get_extra_info("peername")
        return isinstance(peer, tuple) and is_loopback(str(peer[0]))

    async def upgrade(self) -> None:
        """TLS on this connection, after the server's go-ahead to STARTTLS/STLS."""
        # Bytes after the go-ahead were sent in cleartext (a man in the middle injecting
        # answers to read as if they came through TLS, CVE-2011-0411): refuse them.
        # StreamReader has no public "bytes buffered"; its _buffer is a bytearray.
        if getattr(self.reader, "_buffer", b""):
            raise ProtocolError("server sent data after agreeing to start TLS")
        assert self._context is not None
        await self.writer.start_tls(self._context, server_hostname=self._host)
        self.secure = True

    async def line(self) -> bytes:
        try:
            line = await self.reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise ProtocolError(f"server sent a line longer than {MAX_LINE} bytes") from None
        self._count(len(line))
        self.lines += 1
        if self.lines > MAX_LINES:
            raise ProtocolError(f"server sent more than {MAX_LINES} lines (bound per login)")
        return line.rstrip(b"\r\n")

    async def literal(self, size: int) -> bytes:
        """An IMAP literal's bytes, counted against the bounds before they are read."""
        self.literals += 1
        if self.literals > MAX_LITERALS:
            raise ProtocolError(f"server sent more than {MAX_LITERALS} literals (bound per login)")
        self._count(size)
        return await self.reader.readexactly(size)

    def _count(self, size: int) -> None:
        self.received += size
        if self.received > MAX_BYTES:
            raise ProtocolError(f"server sent more than {MAX_BYTES} bytes (bound per login)")

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def goodbye(self, command: bytes) -> None:
        # Polite LOGOUT/QUIT; the verdict is already made, so its failure changes nothing.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self.send(command)
                left = MAX_LINE  # a server that keeps talking is not read for long
                while left > 0 and (data := await self.reader.read(4096)):
                    left -= len(data)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self.writer.wait_closed()


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (and IPv4-mapped 127.x); a name or anything else is not."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


def safe_text(data: bytes, limit: int = 80) -> str:
    """Printable ASCII of what a server sent BEFORE we sent a password (never after)."""
    return "".join(chr(c) if 32 <= c < 127 else "?" for c in data[:limit])
