"""Reading the message after 354: the end marker, bare newlines, dot-unstuffing, the limits.

aiosmtpd reads DATA one line per `readuntil` call, a third of ofmipd's CPU time
for a 4 KB message. Here the stream is read up to each ".<CRLF>", so a chunk
holds many lines, and the RFC 5321 rules are applied to the whole message at
once with bytes methods. The message ends only at <CRLF>.<CRLF>: a bare LF or CR
never ends it (<LF>.<LF>, <CR>.<CR>, <LF>.<CRLF> are content), which is what keeps
SMTP smuggling out. A line starting with "." loses that dot, a line longer than
the limit fails the message, and so does a message over the size limit; in both
cases the rest is read and thrown away before the reply, so the client's next
command is not taken from the middle of its message.

A bare LF or CR (one not in a CRLF pair) is handled as --bare-newline says, like
Postfix's smtpd_forbid_bare_newline: "normalize" takes each as a line ending, so
the message handed on has CRLF line endings only and its lines are dot-unstuffed
like any other; "reject" refuses the message.
"""

from __future__ import annotations

import asyncio

MARK = b".\r\n"
END = b"\r\n.\r\n"


class TooLong(Exception):
    """A line over the line length limit."""


class TooBig(Exception):
    """A message over the size limit."""


class BareNewline(Exception):
    """A bare LF or CR in the message, with --bare-newline reject; str() names which."""


BARE_NEWLINE_MODES = ("normalize", "reject")


async def read_message(
    reader: asyncio.StreamReader,
    *,
    size_limit: int,
    line_limit: int,
    bare_newline: str = "normalize",
) -> bytes:
    """The unstuffed message up to <CRLF>.<CRLF>, with CRLF line endings only; raises
    TooBig, BareNewline or TooLong (checked in that order) once it is all read.

    `line_limit` counts the CRLF, as aiosmtpd's line_length_limit does. EOF
    raises asyncio.IncompleteReadError, as StreamReader does.
    """
    chunks: list[bytes] = []
    size = 0
    tail = b"\r\n"  # the start of DATA counts as the start of a line
    while True:
        try:
            chunk = await reader.readuntil(MARK)
            complete = True
        except asyncio.LimitOverrunError as overrun:  # no mark within the buffer limit
            chunk = await reader.read(overrun.consumed)
            complete = False
        window = chunk[-5:] if len(chunk) >= 5 else (tail + chunk)[-5:]
        if complete and window == END:
            chunks.append(chunk[:-3])  # the CRLF before the dot ends the last line
            size += len(chunk) - 3
            break
        tail = chunk[-4:] if len(chunk) >= 4 else (tail + chunk)[-4:]
        size += len(chunk)
        if size <= size_limit:
            chunks.append(chunk)
        elif chunks:
            chunks.clear()  # over the limit: keep reading, but hold nothing
    if size > size_limit:
        raise TooBig
    message = b"".join(chunks)
    pairs = message.count(b"\r\n")
    if message.count(b"\n") != pairs or message.count(b"\r") != pairs:
        if bare_newline == "reject":
            raise BareNewline("<LF>" if message.count(b"\n") != pairs else "<CR>")
        # Every CRLF, bare CR and bare LF becomes one CRLF ("\r\r\n" is a bare CR, then
        # a CRLF). That adds a byte per bare ending, so the size is checked again.
        message = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        if len(message) > size_limit:
            raise TooBig
    if len(message) >= line_limit and max(map(len, message.split(b"\r\n"))) > line_limit - 2:
        raise TooLong
    if message.startswith(b"."):
        message = message[1:]
    return message.replace(b"\r\n.", b"\r\n")
