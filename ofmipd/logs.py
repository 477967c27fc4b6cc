"""Log set-up (stderr or syslog, never stdout) and the redaction that keeps secrets out.

aiosmtpd logs every command line it reads, "AUTH PLAIN <payload>" included, so
its logger is quiet unless --debug, and then a filter blanks AUTH payloads.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from typing import Any


@functools.cache
def _auth_payload() -> tuple[re.Pattern[bytes], re.Pattern[str]]:
    # Compiled on first use, not at every one-session start.
    pattern = r"(?is)^(\s*AUTH\s+\S+)\s+\S.*$"
    return re.compile(pattern.encode()), re.compile(pattern)


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
def _url_userinfo() -> re.Pattern[str]:
    return re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/@\s:]*):[^/@\s]*@")


def redact_url(text: str) -> str:
    """Hide the password of every URL in `text`: redis://:PW@host -> redis://:***@host,
    imaps://user:PW@host -> imaps://user:***@host. For --check-config, errors and logs."""
    return _url_userinfo().sub(r"\1:***@", text) if "://" in text else text


def redact(value: Any) -> Any:
    """AUTH <mechanism> <initial response> -> AUTH <mechanism> <redacted>."""
    if isinstance(value, str):
        text = _auth_payload()[1].match(value)  # every record passes here: no encoding first
        return text.group(1) + " <redacted>" if text else value
    if isinstance(value, bytes | bytearray):
        raw = _auth_payload()[0].match(bytes(value))
        return raw.group(1) + b" <redacted>" if raw else value
    return value


class RedactAuth(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(arg) for arg in record.args)
        elif isinstance(record.msg, str | bytes):
            record.msg = redact(record.msg)
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
        syslog_handler.setFormatter(logging.Formatter("ofmipd[%(process)d]: %(message)s"))
        handlers.append(syslog_handler)
    if stderr or not handlers:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(
            logging.Formatter("%(asctime)s ofmipd[%(process)d]: %(levelname)s %(message)s")
        )
        handlers.append(stream)
    for each in handlers:
        each.addFilter(RedactAuth())
        root.addHandler(each)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # What the logging HOWTO ("Optimization") says to switch off when no format uses it:
    # the caller's frame walk, thread, task and multiprocessing names on every record.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # type: ignore[attr-defined]  # Python 3.12+
    # aiosmtpd's own logger repeats every command line; only a debug trace wants it.
    logging.getLogger("mail.log").setLevel(logging.DEBUG if debug else logging.WARNING)
    logging.getLogger("mail.log").addFilter(RedactAuth())
    # In asyncio's debug mode (PYTHONASYNCIODEBUG, -X dev) its logger writes a traceback
    # for every failed TLS handshake; the session's end line already says what failed.
    logging.getLogger("asyncio").setLevel(logging.INFO)
    while _pending:
        record = _pending.pop(0)
        if record.levelno >= root.level:
            root.handle(record)
