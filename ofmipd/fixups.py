"""RFC 6409 §8 fix-ups of a submitted message: Message-ID and Date when missing.

Only the header section is read: it ends at the first empty line, or at the first
line that is not a header field (a message with no separator), as Postfix's cleanup
sees it. A field name may be followed by blanks before its colon (RFC 5322 obsolete
syntax), and Postfix accepts that too, so it counts here. Added fields go at the end
of the header section; a message that has them is returned untouched.

The message's CRLF line endings are data.py's doing: bare LF and CR are gone by now.
"""

from __future__ import annotations

import os
import re

# A field: printable ASCII except ":", optional blanks, then the colon.
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")


def header_end(content: bytes, continued: bool = False) -> int:
    """The offset where the header section ends: the empty line, or the first line that
    is neither a field nor a continuation (len(content) if the header runs to the end).
    `continued`: `content` follows lines of the header already read, so a continuation
    line first is one of theirs."""
    position = 0
    first = not continued
    while position < len(content):
        line_end = content.find(b"\r\n", position)
        line_end = len(content) if line_end < 0 else line_end + 2
        line = content[position:line_end]
        folded = line[:1] in (b" ", b"\t") and not first
        if not folded and not _FIELD.match(line):
            return position
        first = False
        position = line_end
    return position


def header_fields(content: bytes, end: int | None = None) -> list[tuple[str, bytes]]:
    """(lowercased name, unfolded value) of each field in the header section, in order."""
    end = header_end(content) if end is None else end
    fields: list[tuple[str, bytes]] = []
    for line in content[:end].split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + line)
            continue
        match = _FIELD.match(line)
        if match:
            name = match.group(1).decode("ascii").lower()
            fields.append((name, line[match.end() :]))
    return fields


def fix_up(
    content: bytes,
    *,
    hostname: str,
    queue_id: str,
    add_message_id: bool,
    add_date: bool,
    now: float | None = None,
) -> bytes:
    """`content` with Message-ID and Date added where missing (and wanted)."""
    if not (add_message_id or add_date):
        return content
    end = header_end(content)
    names = {name for name, _ in header_fields(content, end)}
    added = []
    if add_message_id and "message-id" not in names:
        # Unique without a counter: the queue id (time and 32 random bits) plus 48 more.
        added.append(f"Message-ID: <{queue_id}.{os.urandom(6).hex()}@{hostname}>\r\n")
    if add_date and "date" not in names:
        import email.utils  # only a message without a Date pays for it

        added.append(f"Date: {email.utils.formatdate(now, localtime=True)}\r\n")
    if not added:
        return content
    head = content[:end]
    if head and not head.endswith(b"\r\n"):  # a header with no line ending at all
        head += b"\r\n"
    rest = content[end:]
    if not rest.startswith(b"\r\n"):  # no separator: a body line (or nothing) follows
        rest = b"\r\n" + rest
    return head + "".join(added).encode("utf-8") + rest  # --hostname may be IDN
