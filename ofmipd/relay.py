"""--relay: each transaction proxied to a downstream MTA over SMTP, on pooled connections.

MAIL takes a connection from the pool and opens the transaction downstream; each RCPT is
forwarded and the downstream's reply goes back to the client at RCPT time; the message
is streamed down while the client sends it (relay_stream.py) and the client hears 250
only after the downstream's 250. Any failure of the downstream inside a transaction is a
4xx to the client and the connection is closed, and so is one whose message was begun
and not finished; a transaction that ends any other way (RSET, a refused DATA) leaves
its connection marked dirty, and the pool sends RSET before it carries another.

The client's identity goes down with XCLIENT (or XFORWARD) before each MAIL, outside
any transaction, so the MTA logs the real client and login. A small SMTP client of its
own on asyncio streams: smtplib would block the loop.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import ssl
import time
from typing import TYPE_CHECKING, NamedTuple

from ofmipd.errors import ConfigError
from ofmipd.logs import printable

if TYPE_CHECKING:
    from ofmipd.delivery import Submission
    from ofmipd.identity import ClientIdentity

log = logging.getLogger("ofmipd.relay")

DOWNSTREAM_FAILED = "451 4.4.0 Relay to the mail system failed, try again later"
POOL_BUSY = "451 4.3.2 Mail system busy, try again later"
ACQUIRE_TIMEOUT = 60.0  # a MAIL waits this long for a free connection to the MTA
COMMAND_TIMEOUT = 60.0  # each downstream command; DATA's reply may take longer
DATA_TIMEOUT = 600.0
IDLE_TIMEOUT = 30.0  # an unused pooled connection is closed after this; Postfix waits 300 s
XCLIENT_LINE = 500  # RFC 5321's 512 octets, with room for "XCLIENT " and CRLF


class RelayError(Exception):
    """The downstream went away, timed out or answered out of protocol."""


class Reply(NamedTuple):
    code: int
    text: str  # the last line's text, enhanced code included

    def line(self) -> str:
        return f"{self.code} {self.text}"


class Downstream(NamedTuple):
    host: str
    port: int
    implicit_tls: bool


def parse_url(url: str) -> Downstream:
    from ofmipd.urls import split_url

    parts = split_url(url, "--relay")
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise ConfigError(f"--relay {url!r}: expected smtp://HOST[:PORT] or smtps://HOST[:PORT]")
    if parts.path not in ("", "/") or parts.query or parts.username:
        raise ConfigError(f"--relay {url!r}: only a scheme, a host and a port are allowed")
    implicit = parts.scheme == "smtps"
    return Downstream(parts.hostname, parts.port or (465 if implicit else 25), implicit)


def read_login(spec: str) -> tuple[str, str]:
    """--relay-auth USER:PASSWORD-FILE: the user and the file's first line, read once at
    start (before privileges are dropped)."""
    from ofmipd.secretfile import warn_if_shared

    user, sep, path = spec.partition(":")
    if not user or not sep or not path:
        raise ConfigError(f"--relay-auth {spec!r}: expected USER:PASSWORD-FILE")
    try:
        with open(path, encoding="utf-8") as file:
            warn_if_shared(os.fstat(file.fileno()), path, "--relay-auth password file")
            password = file.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not UTF-8 text"
        raise ConfigError(f"--relay-auth: {path}: {reason}") from None
    if not password:
        raise ConfigError(f"--relay-auth: {path}: the first line (the password) is empty")
    return user, password


def xtext(value: str) -> str:
    """RFC 3461 xtext: '+', '=' and anything outside ! to ~ as +XX (UTF-8 octets)."""
    out = []
    for byte in value.encode("utf-8"):
        char = chr(byte)
        out.append(char if 33 <= byte <= 126 and char not in "+=" else f"+{byte:02X}")
    return "".join(out)


def stuffed(content: bytes) -> bytes:
    """The DATA payload: dot-stuffed, ending in CRLF, then the end marker."""
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    return stuff(content) + b".\r\n"


def stuff(lines: bytes) -> bytes:
    """Whole lines of a message, dot-stuffed: a line starting with "." gets another."""
    if lines.startswith(b"."):
        lines = b"." + lines
    return lines.replace(b"\r\n.", b"\r\n..")


class Connection:
    """One SMTP client connection, after its EHLO."""

    __slots__ = (
        "reader", "writer", "extensions", "dirty", "idle_handle", "used", "pending", "in_flight"
    )  # fmt: skip

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.extensions: dict[str, str] = {}
        self.dirty = False  # a transaction may be open: RSET before the next
        self.idle_handle: asyncio.TimerHandle | None = None
        self.used = 0
        # With PIPELINING, commands whose replies are read with the next command's: one
        # write and one wake-up for RSET + XFORWARD + MAIL instead of three.
        self.pending: list[tuple[str, int]] = []
        # Sent and not yet answered: a connection left so (its user cancelled) would hand
        # the stale reply to the next command, so the pool closes it instead.
        self.in_flight = False

    async def reply(self, wait: float = COMMAND_TIMEOUT) -> Reply:
        code, lines = await self.reply_lines(wait)
        return Reply(code, lines[-1])

    async def reply_lines(self, wait: float) -> tuple[int, list[str]]:
        lines: list[str] = []
        try:
            async with asyncio.timeout(wait):
                while True:
                    raw = await self.reader.readline()
                    if not raw.endswith(b"\n"):
                        raise RelayError("connection closed")
                    line = raw.decode("utf-8", "replace").rstrip("\r\n")
                    if len(line) < 3 or not line[:3].isdigit():
                        raise RelayError(f"bad reply {printable(line)!r}")
                    lines.append(line[4:])
                    if line[3:4] != "-":
                        return int(line[:3]), lines
        except TimeoutError:
            raise RelayError("timed out") from None
        except (OSError, ValueError) as error:  # ValueError: a line over the stream limit
            raise RelayError(str(error) or type(error).__name__) from None

    def send(self, *commands: str) -> None:
        self.in_flight = True
        self.writer.write("".join(f"{c}\r\n" for c in commands).encode("utf-8"))

    def pipeline(self, line: str, expect: int) -> bool:
        """Queue `line` to go with the next command, if the server allows; else False."""
        if "PIPELINING" not in self.extensions:
            return False
        self.pending.append((line, expect))
        return True

    async def command(self, line: str, wait: float = COMMAND_TIMEOUT) -> Reply:
        pending, self.pending = self.pending, []
        self.send(*(queued for queued, _ in pending), line)
        for queued, expect in pending:
            reply = await self.reply(wait)
            if reply.code != expect:
                raise RelayError(f"{queued.split()[0]} refused: {reply.line()}")
        reply = await self.reply(wait)
        self.in_flight = False
        return reply

    async def ehlo(self, name: str) -> None:
        self.send(f"EHLO {name}")
        code, lines = await self.reply_lines(COMMAND_TIMEOUT)
        if code != 250:
            raise RelayError(f"EHLO refused: {code} {printable(lines[-1])}")
        self.extensions = {}
        for line in lines[1:]:
            keyword, _, params = line.partition(" ")
            self.extensions[keyword.upper()] = params
        self.in_flight = False

    def close(self) -> None:
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        self.writer.close()

    def quit(self) -> None:
        """QUIT without waiting for the 221: the write goes out before the close."""
        if not self.writer.is_closing():
            self.send("QUIT")
        self.close()


class Relay:
    """The pool: at most `size` connections to one downstream, idle ones reused.

    It is the delivery target too, for describe(); messages go down only through a
    Transaction, so deliver() is reached only by a DATA without one, and says so."""

    name = "relay"

    def __init__(
        self,
        downstream: Downstream,
        *,
        tls: str,
        size: int,
        identity: str,
        hostname: str,
        login: tuple[str, str] | None = None,
    ) -> None:
        self.downstream = downstream
        self.login = login  # --relay-auth (user, password)
        self.tls = tls
        self.size = size
        self.identity = identity
        self.hostname = hostname
        self.idle: list[Connection] = []
        self.slots: asyncio.Semaphore | None = None  # made in the loop that uses it
        self.warned_identity = False

    def describe(self) -> str:
        scheme = "smtps" if self.downstream.implicit_tls else "smtp"
        return f"{scheme}://{self.downstream.host}:{self.downstream.port}"

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if self.tls != "require":
            # Opportunistic TLS, as Postfix's "may": encryption without authentication.
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    async def _connect(self) -> Connection:
        host, port, implicit = self.downstream
        context = self._tls_context() if implicit else None
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=context, limit=64 * 1024
                )
        except (OSError, TimeoutError) as error:
            raise RelayError(f"connect: {error or type(error).__name__}") from None
        conn = Connection(reader, writer)
        try:
            greeting = await conn.reply()
            if greeting.code != 220:
                raise RelayError(f"greeting {greeting.line()}")
            await conn.ehlo(self.hostname)
            secure = implicit
            if not implicit and self.tls != "none" and "STARTTLS" in conn.extensions:
                reply = await conn.command("STARTTLS")
                if reply.code != 220:
                    raise RelayError(f"STARTTLS refused: {reply.line()}")
                # Bytes after the go-ahead came in cleartext: a man in the middle's answers
                # to be read as if through TLS (CVE-2011-0411). StreamReader has no public
                # "bytes buffered"; its _buffer is a bytearray.
                if getattr(reader, "_buffer", b""):
                    raise RelayError("STARTTLS: downstream sent data after its go-ahead")
                await writer.start_tls(self._tls_context(), server_hostname=host)
                await conn.ehlo(self.hostname)
                secure = True
            elif not implicit and self.tls == "require":
                raise RelayError("STARTTLS not offered and --relay-tls require")
            if self.login is not None:
                await self._authenticate(conn, secure)
        except (OSError, TimeoutError) as error:  # ssl.SSLError is an OSError
            conn.close()
            raise RelayError(f"TLS: {error or type(error).__name__}") from None
        except BaseException:
            conn.close()
            raise
        self._check_identity(conn)
        return conn

    async def _authenticate(self, conn: Connection, secure: bool) -> None:
        """AUTH PLAIN, only inside TLS: --relay-auth never sends its password in clear."""
        assert self.login is not None
        user, password = self.login
        if not secure:
            raise RelayError("no TLS to send --relay-auth over (the relay offers no STARTTLS)")
        if "PLAIN" not in conn.extensions.get("AUTH", "").upper().split():
            raise RelayError(
                f"relay does not offer AUTH PLAIN (AUTH {conn.extensions.get('AUTH')})"
            )
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
        reply = await conn.command(f"AUTH PLAIN {token}")
        if reply.code != 235:
            raise RelayError(f"AUTH as {printable(user)} refused: {reply.line()}")

    async def probe(self) -> None:
        """At start: one connection, so the log tells the admin now, not at the first
        message, whether the MTA answers and takes XCLIENT; it then waits in the pool."""
        if self.slots is None:
            self.slots = asyncio.Semaphore(self.size)
        await self.slots.acquire()
        try:
            conn = await self._connect()
        except RelayError as error:
            self.slots.release()
            log.warning("relay %s: not reachable at start: %s", self.describe(), error)
            return
        kinds = [k for k in ("XCLIENT", "XFORWARD", "PIPELINING") if k in conn.extensions]
        log.info("relay %s: ready (%s)", self.describe(), " ".join(kinds) or "no extensions")
        self.release(conn)

    def _check_identity(self, conn: Connection) -> None:
        if self.identity == "auto" and not self.warned_identity:
            if "XCLIENT" not in conn.extensions and "XFORWARD" not in conn.extensions:
                self.warned_identity = True
                log.warning(
                    "relay %s offers neither XCLIENT nor XFORWARD: it will see ofmipd, "
                    "not the client, and no login",
                    self.describe(),
                )

    async def _acquire(self) -> Connection:
        """An idle connection that still answers, or a new one."""
        while self.idle:
            conn = self.idle.pop()
            if conn.idle_handle is not None:
                conn.idle_handle.cancel()
                conn.idle_handle = None
            if conn.reader.at_eof() or conn.writer.is_closing():
                conn.close()
                continue
            if not conn.dirty:
                return conn
            if conn.pipeline("RSET", 250):  # checked with the next command
                conn.dirty = False
                return conn
            try:
                if (await conn.command("RSET")).code == 250:
                    conn.dirty = False
                    return conn
            except RelayError:
                pass
            conn.close()
        return await self._connect()

    def release(self, conn: Connection, *, broken: bool = False) -> None:
        if self.slots is not None:
            self.slots.release()
        if broken or conn.in_flight or conn.writer.is_closing():
            conn.close()
            return
        conn.idle_handle = asyncio.get_running_loop().call_later(IDLE_TIMEOUT, self._expire, conn)
        self.idle.append(conn)

    def _expire(self, conn: Connection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)
            conn.quit()

    def close(self) -> None:
        """At the end (a daemon stopping, a -1 session over): the idle connections say QUIT,
        so the MTA logs a clean end, not a lost connection. Busy ones go with their session."""
        while self.idle:
            self.idle.pop().quit()

    async def deliver(self, submission: Submission) -> str:
        log.error("%s: relay: no open transaction downstream", submission.queue_id)
        return DOWNSTREAM_FAILED

    async def begin(
        self, identity: Identity, sender: str, options: list[str]
    ) -> tuple[str, Transaction | None]:
        """MAIL downstream: the reply for the client and, if it was 250, the transaction."""
        if self.slots is None:
            self.slots = asyncio.Semaphore(self.size)
        try:
            async with asyncio.timeout(ACQUIRE_TIMEOUT):
                await self.slots.acquire()
        except TimeoutError:
            log.warning("relay %s: all %d connections busy", self.describe(), self.size)
            return POOL_BUSY, None
        conn: Connection | None = None
        try:
            # A pooled connection may have died since it was used (the MTA restarted, its
            # idle timeout): one fresh connection replaces it without failing the client.
            for attempt in (1, 2):
                conn = None
                try:
                    conn = await self._acquire()
                    reply = await self._mail(conn, identity, sender, options)
                except RelayError as error:
                    if conn is not None:
                        conn.close()
                    if attempt == 1 and conn is not None and conn.used > 0:
                        continue
                    conn = None
                    self.slots.release()
                    log.warning("relay %s: MAIL failed: %s", self.describe(), error)
                    return DOWNSTREAM_FAILED, None
                break
        except BaseException:  # cancelled (the client went away): give back what we hold
            if conn is not None:
                conn.close()
            self.slots.release()
            raise
        assert conn is not None
        conn.used += 1
        if reply.code != 250:
            self.release(conn, broken=reply.code == 421)
            return _for_client(reply), None
        conn.dirty = True
        return _for_client(reply), Transaction(self, conn)

    async def _mail(
        self, conn: Connection, identity: Identity, sender: str, options: list[str]
    ) -> Reply:
        extensions = conn.extensions
        kind = self.identity
        if kind == "auto":
            kind = "xclient" if "XCLIENT" in extensions else "xforward"
        if kind == "xclient" and "XCLIENT" in extensions:
            for line in identity.xclient(extensions["XCLIENT"]):
                reply = await conn.command(line)
                if reply.code != 220:
                    raise RelayError(f"XCLIENT refused: {reply.line()}")
            await conn.ehlo(self.hostname)  # XCLIENT restarts the session
        elif kind == "xforward" and "XFORWARD" in extensions:
            for line in identity.xforward(extensions["XFORWARD"]):
                if not conn.pipeline(line, 250):
                    reply = await conn.command(line)
                    if reply.code != 250:
                        raise RelayError(f"XFORWARD refused: {reply.line()}")
        params = "".join(f" {o}" for o in options if _offered(o, extensions))
        return await conn.command(f"MAIL FROM:<{sender}>{params}")


def _offered(option: str, extensions: dict[str, str]) -> bool:
    """A MAIL parameter goes down only if the downstream offers its extension."""
    keyword = option.partition("=")[0].upper()
    needs = {"SIZE": "SIZE", "BODY": "8BITMIME", "SMTPUTF8": "SMTPUTF8"}.get(keyword)
    return needs is not None and needs in extensions


def _for_client(reply: Reply) -> str:
    """The downstream's reply as ofmipd's; a 421 (it is closing) must not close ours."""
    if reply.code == 421 or not 200 <= reply.code < 600:
        return DOWNSTREAM_FAILED
    return reply.line()


class Transaction:
    """One open transaction downstream: open_data(), send() and end_data() carry its
    message; abort() or discard() end it without one."""

    __slots__ = ("relay", "conn")
    name = "relay"

    def __init__(self, relay: Relay, conn: Connection) -> None:
        self.relay = relay
        self.conn: Connection | None = conn

    async def rcpt(self, address: str) -> str:
        conn = self.conn
        if conn is None:
            return DOWNSTREAM_FAILED
        try:
            reply = await conn.command(f"RCPT TO:<{address}>")
        except RelayError as error:
            self._fail("RCPT", error)
            return DOWNSTREAM_FAILED
        return _for_client(reply)

    async def open_data(self) -> str | None:
        """DATA downstream: None once it answered 354, else the reply for the client (and
        the transaction is over). From here until end_data() the connection is mid-message:
        whatever ends the transaction sooner closes it without the final dot, and the MTA
        throws the partial message away."""
        conn = self.conn
        if conn is None:
            return DOWNSTREAM_FAILED
        try:
            reply = await conn.command("DATA")
        except RelayError as error:
            self._fail("DATA", error)
            return DOWNSTREAM_FAILED
        if reply.code != 354:
            self.discard() if reply.code == 421 else self.abort()  # 421: it is closing
            return _for_client(reply)
        conn.in_flight = True  # so the pool closes it rather than reuse it mid-message
        return None

    async def send(self, lines: bytes) -> bool:
        """Whole lines of the message down, dot-stuffed; False if the downstream failed or
        stopped reading for DATA_TIMEOUT (the transaction is then over). Waiting for it
        to drain is what slows the client to the downstream's pace."""
        conn = self.conn
        if conn is None:
            return False
        try:
            conn.writer.write(stuff(lines))
            async with asyncio.timeout(DATA_TIMEOUT):
                await conn.writer.drain()
        except (OSError, TimeoutError) as error:
            self._fail("DATA", RelayError(str(error) or type(error).__name__))
            return False
        return True

    async def end_data(self) -> str:
        """The final dot; the downstream's reply to it, for the client."""
        conn = self.conn
        if conn is None:
            return DOWNSTREAM_FAILED
        started = time.monotonic()
        try:
            conn.writer.write(b".\r\n")
            reply = await conn.reply(DATA_TIMEOUT)
            conn.in_flight = False
        except (OSError, RelayError) as error:
            # RFC 1047's window: the MTA may have queued the message and gone before its
            # 250 reached us. 451 makes the client send it again (a possible duplicate);
            # a 250 could lose it. The admin is told which.
            self._fail(
                "DATA",
                RelayError(
                    f"{error} after the message was sent: OUTCOME UNKNOWN, "
                    "the MTA may have queued it"
                ),
            )
            return DOWNSTREAM_FAILED
        log.debug("relay: DATA answered in %.3f s", time.monotonic() - started)
        self.conn = None
        conn.dirty = False  # the transaction is over, whatever the answer
        self.relay.release(conn, broken=reply.code == 421)
        return _for_client(reply)

    async def data(self, content: bytes) -> str:
        """The whole message down at once (the session streams it with send())."""
        refusal = await self.open_data()
        if refusal is not None:
            return refusal
        if not content.endswith(b"\r\n"):
            content += b"\r\n"
        if not await self.send(content):
            return DOWNSTREAM_FAILED
        return await self.end_data()

    def discard(self) -> None:
        """The message will not be sent whole: close the connection, without the dot."""
        conn, self.conn = self.conn, None
        if conn is not None:
            self.relay.release(conn, broken=True)

    def abort(self) -> None:
        """The client's transaction ended without a message: the pool RSETs it later."""
        conn, self.conn = self.conn, None
        if conn is not None:
            self.relay.release(conn)

    def _fail(self, stage: str, error: RelayError) -> None:
        log.warning("relay %s: %s failed: %s", self.relay.describe(), stage, error)
        conn, self.conn = self.conn, None
        if conn is not None:
            self.relay.release(conn, broken=True)


class Identity(NamedTuple):
    """What XCLIENT/XFORWARD tell the downstream about the client."""

    client: ClientIdentity
    helo: str | None
    login: str | None
    esmtp: bool

    def _attributes(self) -> list[tuple[str, str]]:
        client = self.client
        return [
            ("NAME", client.hostname or "[UNAVAILABLE]"),
            ("ADDR", client.ip or "[UNAVAILABLE]"),
            ("PORT", str(client.port) if client.port else "[UNAVAILABLE]"),
            ("HELO", self.helo or "[UNAVAILABLE]"),
            ("PROTO", "ESMTP" if self.esmtp else "SMTP"),
            ("LOGIN", self.login or "[UNAVAILABLE]"),
        ]

    def xclient(self, offered: str) -> list[str]:
        return _lines("XCLIENT", self._attributes(), offered)

    def xforward(self, offered: str) -> list[str]:
        # XFORWARD has no login (its IDENT is the previous hop's queue id): XCLIENT does.
        return _lines("XFORWARD", self._attributes(), offered)


def _lines(verb: str, attributes: list[tuple[str, str]], offered: str) -> list[str]:
    """`VERB NAME=xtext ...` lines, each under 512 octets, with only the offered names."""
    names = set(offered.upper().split())
    lines: list[str] = []
    current = verb
    for name, value in attributes:
        if name not in names:
            continue
        item = f" {name}={xtext(value)[:255]}"
        if len(current) + len(item) > XCLIENT_LINE and current != verb:
            lines.append(current)
            current = verb
        current += item
    if current != verb:
        lines.append(current)
    return lines
