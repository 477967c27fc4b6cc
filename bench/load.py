"""Load generator: N complete authenticated submissions at concurrency C, timed per phase.

Each session: connect, 220, EHLO, [STARTTLS, EHLO], AUTH PLAIN, MAIL, RCPT, DATA with a
4 KB message, QUIT. Any reply other than the expected one fails the session, and any
failed session makes run_load() raise, so a number is never reported for broken runs.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import statistics
import time
from dataclasses import dataclass, field

USER = "bench"
PASSWORD = "Bench-Secret-42"
SENDER = "bench@example.org"
RECIPIENT = "sink@example.net"
TIMEOUT = 60.0


def make_message(size: int = 4096) -> bytes:
    """A 4 KB message with CRLF line endings and no line starting with a dot."""
    head = (
        f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: benchmark message\r\n"
        "Message-ID: <bench@example.org>\r\n\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog 0123456789 abcdefghij.\r\n"
    body = line * ((size - len(head)) // len(line) + 1)
    return (head + body)[:size].rstrip(b"\r\n.") + b"\r\n"


MESSAGE = make_message()


class SessionError(Exception):
    """A reply that a healthy submission server would not give."""


def plain_token(user: str = USER, password: str = PASSWORD) -> bytes:
    return base64.b64encode(f"\0{user}\0{password}".encode())


_CLIENT_TLS: ssl.SSLContext | None = None


def client_tls() -> ssl.SSLContext:
    """One context for all sessions: building one loads the CA store (tens of ms)."""
    global _CLIENT_TLS
    if _CLIENT_TLS is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the servers use throw-away self-signed certs
        _CLIENT_TLS = context
    return _CLIENT_TLS


@dataclass
class Timings:
    session: list[float] = field(default_factory=list)
    banner: list[float] = field(default_factory=list)
    auth: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class LoadResult:
    sessions: int
    concurrency: int
    seconds: float
    session_p50: float
    session_p99: float
    banner_p50: float
    banner_p99: float
    auth_p50: float
    auth_p99: float

    @property
    def rate(self) -> float:
        return self.sessions / self.seconds


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, list[bytes]]:
    lines: list[bytes] = []
    while True:
        line = await reader.readline()
        if not line.endswith(b"\n"):
            raise SessionError(f"connection closed after {lines!r}")
        lines.append(line.rstrip(b"\r\n"))
        if line[3:4] != b"-":
            break
    try:
        return int(lines[-1][:3]), lines
    except ValueError:
        raise SessionError(f"malformed reply {lines!r}") from None


async def expect(reader: asyncio.StreamReader, code: int, what: str) -> list[bytes]:
    got, lines = await read_reply(reader)
    if got != code:
        raise SessionError(f"{what}: expected {code}, got {b' / '.join(lines)!r}")
    return lines


async def command(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: bytes, code: int
) -> list[bytes]:
    writer.write(line + b"\r\n")
    return await expect(reader, code, line.split(b" ")[0].decode())


async def one_session(
    host: str,
    port: int,
    *,
    starttls: bool,
    timings: Timings,
    user: str = USER,
    password: str = PASSWORD,
    auth_code: int = 235,
    full: bool = True,
) -> None:
    """One submission; appends its timings. `full=False` stops after AUTH."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await expect(reader, 220, "banner")
        banner = time.perf_counter()
        ehlo = await command(reader, writer, b"EHLO bench.example.org", 250)
        if starttls:
            if not any(b"STARTTLS" in x for x in ehlo):
                raise SessionError(f"STARTTLS not offered: {ehlo!r}")
            await command(reader, writer, b"STARTTLS", 220)
            await writer.start_tls(client_tls())
            ehlo = await command(reader, writer, b"EHLO bench.example.org", 250)
        if not any(b"AUTH" in x and b"PLAIN" in x for x in ehlo):
            raise SessionError(f"AUTH PLAIN not offered: {ehlo!r}")
        before_auth = time.perf_counter()
        await command(reader, writer, b"AUTH PLAIN " + plain_token(user, password), auth_code)
        after_auth = time.perf_counter()
        if full:
            await command(reader, writer, f"MAIL FROM:<{SENDER}>".encode(), 250)
            await command(reader, writer, f"RCPT TO:<{RECIPIENT}>".encode(), 250)
            await command(reader, writer, b"DATA", 354)
            writer.write(MESSAGE + b".\r\n")
            await expect(reader, 250, "end of DATA")
        await command(reader, writer, b"QUIT", 221)
        end = time.perf_counter()
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass  # the server may close first; the session already succeeded or failed
    timings.session.append(end - start)
    timings.banner.append(banner - start)
    timings.auth.append(after_auth - before_auth)


class Progress:
    """A single self-overwriting stderr line."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.done = 0
        self.last = 0.0

    def step(self) -> None:
        import sys

        self.done += 1
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.5 or self.done == self.total):
            self.last = now
            sys.stderr.write(f"\r  {self.label}: {self.done}/{self.total}\x1b[K")
            if self.done == self.total:
                sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


async def run_load(
    host: str,
    port: int,
    *,
    sessions: int,
    concurrency: int,
    starttls: bool = False,
    progress: Progress | None = None,
) -> LoadResult:
    """Run `sessions` submissions with `concurrency` in flight; raise on any failure."""
    timings = Timings()
    failures: list[str] = []
    remaining = iter(range(sessions))

    async def worker() -> None:
        for _ in remaining:
            try:
                await asyncio.wait_for(
                    one_session(host, port, starttls=starttls, timings=timings), TIMEOUT
                )
            except (SessionError, OSError, ssl.SSLError, TimeoutError) as error:
                failures.append(f"{type(error).__name__}: {error}")
            if progress is not None:
                progress.step()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    if failures:
        raise SessionError(
            f"{len(failures)} of {sessions} sessions to {host}:{port} failed; first: {failures[0]}"
        )
    return LoadResult(
        sessions=sessions,
        concurrency=concurrency,
        seconds=seconds,
        session_p50=statistics.median(timings.session),
        session_p99=percentile(timings.session, 0.99),
        banner_p50=statistics.median(timings.banner),
        banner_p99=percentile(timings.banner, 0.99),
        auth_p50=statistics.median(timings.auth),
        auth_p99=percentile(timings.auth, 0.99),
    )
