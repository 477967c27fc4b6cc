"""Log set-up (stderr or syslog, never stdout), the escaping that keeps one event on one
line, and the redaction that keeps secrets out.

Client-supplied values go through printable() where they are logged; as a last resort the
handlers escape any formatted message that still is not printable, so a forgotten call
site cannot write a second, forged line. aiosmtpd logs every command line it reads,
"AUTH PLAIN <payload>" included, so its logger is quiet unless --debug, and then
ClientLines shows AUTH lines without their payload and lines that are no command
(base64 answers to 334 that reached the command loop, junk) by their length only.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from typing import Any

# An AUTH-looking start: AUTH, and what a confused or hostile client makes of it (XAUTH,
# "auth\tplain", "AUTH PLAIN=..."), but not words like "authfile"; then the mechanism.
_AUTH_KEYWORD = r"(?i)\s*[a-z]{0,2}auth(?![a-z0-9_])"
_MECHANISM = r"(?i)\s+[a-z0-9_-]{1,20}(?=[\s=]|\Z)"


@functools.cache
def _auth_words(kind: type) -> tuple[re.Pattern[Any], re.Pattern[Any]]:
    # Compiled on first use, not at every one-session start.
    if kind is bytes:
        return re.compile(_AUTH_KEYWORD.encode()), re.compile(_MECHANISM.encode())
    return re.compile(_AUTH_KEYWORD), re.compile(_MECHANISM)


MAX_MESSAGE = 8192  # characters of one log message kept by the last-resort escaping


def printable(value: object, limit: int = 256) -> str:
    """A client-supplied value as one safe log field, like Postfix's printable().

    Anything that could end a log line or fake one (C0 and C1 controls, DEL, NEL,
    U+2028/U+2029, other invisible format characters) and the backslash itself become
    \\xNN or \\uNNNN escapes, so a value is always one printable line and an escape in
    the log always means the client sent that character. Bytes that are not UTF-8 show
    as \\xNN. Longer values are cut at `limit` characters and end in "...".
    """
    if isinstance(value, bytes | bytearray):
        text = bytes(value).decode("utf-8", "surrogateescape")
    else:
        text = str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable() and "\\" not in text:  # the common case: nothing to do
        return text
    return "".join(_escape(char) for char in text)


def _escape(char: str) -> str:
    if char.isprintable() and char != "\\":
        return char
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


@functools.cache
def _url_authority() -> re.Pattern[str]:
    # scheme://AUTHORITY, up to a path, query, fragment, space or quote.
    return re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/?#\s'\"]+)")


def _hide_password(match: re.Match[str]) -> str:
    scheme, authority = match.groups()
    userinfo, at, host = authority.rpartition("@")  # the last "@": a password may hold one
    if at:
        user, colon, _ = userinfo.partition(":")
        return f"{scheme}{user}:***@{host}" if colon else match.group(0)
    # No "@": a password typed without "@host" reads as the port, so a port that is not
    # a number is hidden too ("redis://:S3cret" -> "redis://:***").
    trimmed = authority.rstrip(":,;.)")
    host, colon, port = trimmed.rpartition(":")
    if not colon or port.isdigit() or "]" in port or (host.startswith("[") and "]" not in host):
        return match.group(0)
    return f"{scheme}{host}:***{authority[len(trimmed) :]}"


def redact_url(text: str) -> str:
    """Hide the password of every URL in `text`: redis://:PW@host -> redis://:***@host,
    imaps://user:PW@host -> imaps://user:***@host. For --check-config, errors and logs."""
    return _url_authority().sub(_hide_password, text) if "://" in text else text


def redact(value: Any) -> Any:
    """AUTH <mechanism> <anything> -> AUTH <mechanism> <redacted>, for AUTH-looking
    text or bytes (see _AUTH_KEYWORD); anything else is returned unchanged."""
    if isinstance(value, str):
        keyword, mechanism = _auth_words(str)  # every record passes here: no encoding first
        marker: Any = " <redacted>"
    elif isinstance(value, bytes | bytearray):
        value = bytes(value)
        keyword, mechanism = _auth_words(bytes)
        marker = b" <redacted>"
    else:
        return value
    found = keyword.match(value)
    if found is None:
        return value
    end = found.end()
    named = mechanism.match(value, end)
    if named is not None:
        end = named.end()
    if not value[end:].strip():  # "AUTH PLAIN" alone carries nothing secret
        return value
    return value[:end] + marker


# Every verb a client line may start with that is shown in the trace; a line starting
# with anything else may be a password's base64 that reached the command loop.
_COMMANDS = frozenset(
    "EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY EXPN HELP STARTTLS PROXY AUTH".split()
)


def client_line(line: Any) -> str:
    """A command line read from the client, as the trace may show it."""
    if isinstance(line, bytes | bytearray):
        text = bytes(line).decode("utf-8", "surrogateescape")
    else:
        text = str(line)
    text = text.rstrip("\r\n")
    shown = redact(text)
    words = text.split(None, 1)
    if shown is not text or (words and words[0].upper() in _COMMANDS):
        return printable(shown, 512)
    return f"<{len(text)} characters, not a command: not shown>"


class ClientLines(logging.Filter):
    """For aiosmtpd's "mail.log" logger: what it logs of client lines, made safe.

    aiosmtpd logs each line twice at debug level (readline, then ">>"); the first goes,
    the second is shown as client_line() says. An unrecognised command is logged at
    WARNING, so without --debug too: it may be base64 meant for a 334 challenge that
    ofmipd never sent (AUTH refused, or pipelined after a 5xx), so only its length is.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg
        if not isinstance(message, str) or not isinstance(record.args, tuple):
            return True
        args = record.args
        if message.startswith("_handle_client readline"):
            return False
        # Formatted here, so that no later filter takes the shown text for client input.
        if len(args) == 2 and message == "%r >> %r":
            record.msg, record.args = f"{args[0]!r} >> {client_line(args[1])}", None
        elif len(args) == 2 and message in ("%r unrecognised: %s", "%r over limit for %s"):
            command = str(args[1])
            shown = command if command in _COMMANDS else f"<{len(command)} characters>"
            record.msg, record.args = message % (args[0], shown), None
        return True


class RedactingFormatter(logging.Formatter):
    """The usual formatting, then URL passwords hidden in whatever the line or its
    traceback quotes: the one place every log line passes on its way out."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_url(super().format(record))


class RedactAuth(logging.Filter):
    """On every handler: AUTH payloads blanked, and a last-resort net that escapes a
    formatted message that is not one printable line (a call site that forgot
    printable() must not let a client write a second, forged log line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(arg) for arg in record.args)
        elif isinstance(record.msg, str | bytes):
            record.msg = redact(record.msg)
        try:
            message = record.getMessage()
        # BLE001: any exception (a bad format string, an argument's __str__) is logging's own
        # handleError's to report; one raised from a filter would reach the caller instead.
        except Exception:  # noqa: BLE001
            return True
        if not message.isprintable():  # the fast path: one C loop over the text
            message = printable(message, MAX_MESSAGE)
        # Formatted once here, not again by each handler's formatter.
        record.msg, record.args = message, None
        return True


_pending: list[logging.LogRecord] = []


class Buffer(logging.Handler):
    """Holds records made before logging is set up (logging.handlers costs 20 ms to import)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < 10000:
            self.records.append(record)


def replay_later(records: list[logging.LogRecord]) -> None:
    """Records made before set-up (e.g. while loading password files), shown by setup()."""
    _pending.extend(records)


def setup(*, debug: bool, syslog: bool, stderr: bool = True) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handlers: list[logging.Handler] = []
    if syslog and os.path.exists("/dev/log"):
        from logging.handlers import SysLogHandler

        syslog_handler = SysLogHandler(address="/dev/log", facility=SysLogHandler.LOG_MAIL)
        syslog_handler.setFormatter(RedactingFormatter("ofmipd[%(process)d]: %(message)s"))
        handlers.append(syslog_handler)
    if stderr or not handlers:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(
            RedactingFormatter("%(asctime)s ofmipd[%(process)d]: %(levelname)s %(message)s")
        )
        handlers.append(stream)
    for each in handlers:
        each.addFilter(RedactAuth())
        root.addHandler(each)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # What the logging HOWTO ("Optimization") says to switch off when no format uses it:
    # the caller's frame walk, thread, task and multiprocessing names on every record.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # type: ignore[attr-defined]  # Python 3.12+
    # aiosmtpd's own logger repeats every command line; only a debug trace wants it.
    trace = logging.getLogger("mail.log")
    trace.setLevel(logging.DEBUG if debug else logging.WARNING)
    if not any(isinstance(f, ClientLines) for f in trace.filters):
        trace.addFilter(ClientLines())
    # In asyncio's debug mode (PYTHONASYNCIODEBUG, -X dev) its logger writes a traceback
    # for every failed TLS handshake; the session's end line already says what failed.
    logging.getLogger("asyncio").setLevel(logging.INFO)
    while _pending:
        record = _pending.pop(0)
        if record.levelno >= root.level:
            root.handle(record)
