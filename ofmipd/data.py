"""Reading the message after 354: the end marker, bare newlines, dot-unstuffing, the limits.

aiosmtpd reads DATA one line per `readuntil` call, a third of ofmipd's CPU time
for a 4 KB message. Here the stream is read up to each ".<CRLF>", so a chunk
holds many lines, and the RFC 5321 rules are applied to a chunk's complete lines
at once with bytes methods. The message ends only at <CRLF>.<CRLF>: a bare LF or
CR never ends it (<LF>.<LF>, <CR>.<CR>, <LF>.<CRLF> are content), which is what
keeps SMTP smuggling out. A line starting with "." loses that dot, a line longer
than the limit fails the message, and so does a message over the size limit; in
both cases the rest is read and thrown away before the reply, so the client's next
command is not taken from the middle of its message.

A bare LF or CR (one not in a CRLF pair) is handled as --bare-newline says, like
Postfix's smtpd_forbid_bare_newline: "normalize" takes each as a line ending, so
the message handed on has CRLF line endings only and its lines are dot-unstuffed
like any other; "reject" refuses the message.

MessageReader gives the message a piece at a time (--relay streams it on), each
piece whole lines; read_message joins the pieces. The rules live only here.
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


class MessageReader:
    """One message from `reader`, piece by piece: read() until `done`.

    Each piece is whole lines (CRLF-terminated), unstuffed, or b"" when a chunk held no
    complete line or the message has already failed. `failed` turns true as soon as the
    message is sure to be refused; read() raises TooBig, BareNewline or TooLong (checked
    in that order) only once the whole message is read. `line_limit` counts the CRLF,
    as aiosmtpd's line_length_limit does. EOF raises asyncio.IncompleteReadError.
    """

    __slots__ = (
        "reader", "size_limit", "line_limit", "reject_bare", "done", "size", "normalized",
        "carry", "tail", "bare_lf", "bare_cr", "too_long",
    )  # fmt: skip

    def __init__(
        self,
        reader: asyncio.StreamReader,
        *,
        size_limit: int,
        line_limit: int,
        bare_newline: str = "normalize",
    ) -> None:
        self.reader = reader
        self.size_limit = size_limit
        self.line_limit = line_limit
        self.reject_bare = bare_newline == "reject"
        self.done = False
        self.size = 0  # octets read, as sent (stuffed, bare newlines and all)
        self.normalized = 0  # octets once bare newlines are CRLF (still stuffed)
        self.carry = b""  # the start of a line whose end has not arrived
        self.tail = b"\r\n"  # the last octets read; DATA's start counts as a line start
        self.bare_lf = self.bare_cr = self.too_long = False

    @property
    def failed(self) -> bool:
        return (
            self.size > self.size_limit
            or self.normalized > self.size_limit
            or (self.reject_bare and (self.bare_lf or self.bare_cr))
            or self.too_long
        )

    async def read(self) -> bytes:
        reader = self.reader
        try:
            chunk = await reader.readuntil(MARK)
            complete = True
        except asyncio.LimitOverrunError as overrun:  # no mark within the buffer limit
            chunk = await reader.read(overrun.consumed)
            complete = False
        if len(chunk) < 5:
            chunk_tail = (self.tail + chunk)[-5:]
        else:
            chunk_tail = chunk[-5:]
        if complete and chunk_tail == END:
            self.done = True
            chunk = chunk[:-3]  # the CRLF before the dot ends the last line
        self.tail = chunk_tail[-4:]
        self.size += len(chunk)
        piece = self._decode(chunk) if self.size <= self.size_limit else b""
        if self.done:
            self._check()
        return piece

    async def joined(self) -> bytes:
        """The whole message at once."""
        pieces = []
        while not self.done:
            piece = await self.read()
            if piece:
                pieces.append(piece)
        return b"".join(pieces)

    def _decode(self, chunk: bytes) -> bytes:
        """The complete lines of carry + chunk, normalised and unstuffed; the rest is
        carried. A CR at the very end is carried too: a LF may follow."""
        data = self.carry + chunk if self.carry else chunk
        if self.done:
            cut = len(data)
        else:
            cut = max(data.rfind(b"\n"), data.rfind(b"\r", 0, len(data) - 1)) + 1
        lines, self.carry = data[:cut], data[cut:]
        if len(self.carry) > self.line_limit:  # no line end in sight: too long already
            self.too_long = True
            self.carry = self.carry[-1:] if self.carry.endswith(b"\r") else b""
        pairs = lines.count(b"\r\n")
        lf = lines.count(b"\n") - pairs
        cr = lines.count(b"\r") - pairs
        self.normalized += len(lines) + lf + cr  # each bare ending becomes two octets
        if lf or cr:
            self.bare_lf = self.bare_lf or lf > 0
            self.bare_cr = self.bare_cr or cr > 0
            if self.failed:
                return b""
            # Every CRLF, bare CR and bare LF becomes one CRLF ("\r\r\n" is a bare CR,
            # then a CRLF).
            lines = lines.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        elif self.failed:
            return b""
        limit = self.line_limit
        if len(lines) >= limit and max(map(len, lines.split(b"\r\n"))) > limit - 2:
            self.too_long = True
            return b""
        if lines.startswith(b"."):
            lines = lines[1:]
        return lines.replace(b"\r\n.", b"\r\n")

    def _check(self) -> None:
        if self.size > self.size_limit:
            raise TooBig
        if self.reject_bare and (self.bare_lf or self.bare_cr):
            raise BareNewline("<LF>" if self.bare_lf else "<CR>")
        if self.normalized > self.size_limit:
            raise TooBig
        if self.too_long:
            raise TooLong


async def read_message(
    reader: asyncio.StreamReader,
    *,
    size_limit: int,
    line_limit: int,
    bare_newline: str = "normalize",
) -> bytes:
    """The unstuffed message up to <CRLF>.<CRLF>, with CRLF line endings only; raises
    as MessageReader.read() does."""
    message = MessageReader(
        reader, size_limit=size_limit, line_limit=line_limit, bare_newline=bare_newline
    )
    return await message.joined()
