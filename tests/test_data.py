"""ofmipd/data.py: the chunked DATA reader gives what a line-by-line RFC 5321 reader gives,
with bare newlines normalised or rejected as --bare-newline says."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ofmipd.data import BareNewline, MessageReader, TooBig, TooLong, read_message

LINE_LIMIT = 1001  # aiosmtpd's line_length_limit, CRLF included


def next_line(stream: bytes, pos: int) -> tuple[bytes, bytes, int] | None:
    """(content, ending, next position) of the line at `pos`; the ending is CRLF, or a bare
    CR or LF. None when the stream ends first (a CR at the very end may start a CRLF)."""
    for i in range(pos, len(stream)):
        if stream[i : i + 1] == b"\n":
            return stream[pos:i], b"\n", i + 1
        if stream[i : i + 1] == b"\r":
            if i + 1 == len(stream):
                return None
            ending = b"\r\n" if stream[i + 1 : i + 2] == b"\n" else b"\r"
            return stream[pos:i], ending, i + len(ending)
    return None


def reference(
    stream: bytes, size_limit: int, line_limit: int = LINE_LIMIT, mode: str = "normalize"
) -> tuple[object, bytes]:
    """One line at a time, as RFC 5321 and --bare-newline describe it: (result, rest of stream).

    A line ends at CRLF, a bare CR or a bare LF. The message ends at a "." line that both
    ends in CRLF and follows a line that did (or starts the message). Every other line
    starting with "." loses that dot. Where several limits are broken the client hears
    the size, then the bare newline, then the line length.
    """
    lines, size, pos, previous = [], 0, 0, b"\r\n"
    while True:
        found = next_line(stream, pos)
        if found is None:
            return "eof", b""
        content, ending, pos = found
        if content == b"." and ending == previous == b"\r\n":
            break
        size += len(content) + len(ending)
        lines.append((content, ending))
        previous = ending
    if size > size_limit:
        return TooBig, stream[pos:]
    if mode == "reject" and any(ending != b"\r\n" for _, ending in lines):
        return BareNewline, stream[pos:]
    if sum(len(content) + 2 for content, _ in lines) > size_limit:
        return TooBig, stream[pos:]  # normalising added a byte per bare ending
    if any(len(content) + 2 > line_limit for content, _ in lines):
        return TooLong, stream[pos:]
    unstuffed = (content[1:] if content.startswith(b".") else content for content, _ in lines)
    return b"".join(line + b"\r\n" for line in unstuffed), stream[pos:]


def run(
    pieces: list[bytes], size_limit: int = 10**6, limit: int = 2**16, mode: str = "normalize"
) -> tuple[object, bytes]:
    """read_message's (message, exception type or "eof") and what is left after it."""
    result, rest = outcome(
        read_message, pieces, size_limit=size_limit, limit=limit, bare_newline=mode
    )
    return (result[0] if isinstance(result, tuple) else result), rest


def test_message_ends_at_crlf_dot_crlf_and_leaves_the_next_command():
    message = b"Subject: hi\r\n\r\nbody.\r\n"
    assert run([message + b".\r\nQUIT\r\n"]) == (message, b"QUIT\r\n")


def test_empty_message_and_a_lone_dot_line_first():
    assert run([b".\r\nQUIT\r\n"]) == (b"", b"QUIT\r\n")
    assert run([b"x\r\n.\r\nNOOP\r\n"]) == (b"x\r\n", b"NOOP\r\n")


def test_dots_at_line_starts_are_unstuffed():
    stream = b"..first\r\n.second\r\n...\r\nmid.dle\r\n..\r\n.\r\n"
    assert run([stream])[0] == b".first\r\nsecond\r\n..\r\nmid.dle\r\n.\r\n"


FAKE_ENDS = [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r.\r", b"\r\n. \r\n"]


@pytest.mark.parametrize("mode", ["normalize", "reject"])
@pytest.mark.parametrize("fake_end", FAKE_ENDS)
def test_bare_lf_or_cr_dot_never_ends_the_message(fake_end, mode):
    # SMTP smuggling: anything but <CRLF>.<CRLF> is message content.
    stream = b"a" + fake_end + b"MAIL FROM:<x@y>\r\n.\r\nQUIT\r\n"
    result, rest = run([stream], mode=mode)
    assert rest == b"QUIT\r\n"
    if mode == "reject" and fake_end != b"\r\n. \r\n":
        assert result is BareNewline
    else:
        assert isinstance(result, bytes) and b"MAIL FROM:<x@y>" in result


def test_bare_newlines_are_normalised_to_crlf_and_those_lines_unstuffed():
    stream = b"Subject: x\nX-A: 1\r\rbody\n..dot\r.\r\r\n.\nlast\r\n.\r\nQUIT\r\n"
    result, rest = run([stream])
    assert result == b"Subject: x\r\nX-A: 1\r\n\r\nbody\r\n.dot\r\n\r\n\r\n\r\nlast\r\n"
    assert rest == b"QUIT\r\n"


def test_reject_refuses_a_bare_lf_or_cr_after_reading_the_whole_message():
    for bare, name in ((b"\n", "<LF>"), (b"\r", "<CR>")):
        stream = b"Subject: x" + bare + b"body\r\n.\r\nNOOP\r\n"
        assert run([stream], mode="reject") == (BareNewline, b"NOOP\r\n")

        async def go(stream: bytes = stream) -> str:
            reader = asyncio.StreamReader()
            reader.feed_data(stream)
            with pytest.raises(BareNewline) as error:
                await read_message(reader, size_limit=10**6, line_limit=1001, bare_newline="reject")
            return str(error.value)

        assert asyncio.run(go()) == name
    clean = b"Subject: x\r\n\r\nbody\r\n"
    assert run([clean + b".\r\n"], mode="reject") == (clean, b"")


def test_normalising_may_not_grow_a_message_past_the_size_limit():
    assert run([b"\n" * 60 + b"\r\n.\r\n"], size_limit=100)[0] is TooBig
    assert run([b"\n" * 49 + b"\r\n.\r\n"], size_limit=100)[0] == b"\r\n" * 50


def test_a_bare_lf_ends_a_line_for_the_line_length_limit():
    lines = (b"y" * 900 + b"\n") * 3
    assert run([lines + b"\r\n.\r\n"])[0] == (b"y" * 900 + b"\r\n") * 3 + b"\r\n"
    assert run([lines + b"\r\n.\r\n"], mode="reject")[0] is BareNewline


def test_a_line_one_octet_over_the_limit_fails_after_reading_it_all():
    ok = b"y" * (LINE_LIMIT - 2) + b"\r\n"
    assert run([ok + b".\r\n"]) == (ok, b"")
    assert run([b"y" + ok + b".\r\nNOOP\r\n"]) == (TooLong, b"NOOP\r\n")


def test_size_limit_counts_the_raw_message_and_drains_it():
    message = b"z" * 98 + b"\r\n"
    assert run([message + b".\r\n"], size_limit=100) == (message, b"")
    assert run([b"z" + message + b".\r\nNOOP\r\n"], size_limit=100) == (TooBig, b"NOOP\r\n")


def test_no_mark_within_the_buffer_limit_still_reads_the_message():
    body = b"0123456789" * 50 + b"\r\n"
    assert run([body * 4 + b".\r\nQUIT\r\n"], limit=64) == (body * 4, b"QUIT\r\n")


def test_eof_before_the_end_is_an_incomplete_read():
    assert run([b"half a message\r\n"]) == ("eof", b"")


# Any stream, cut anywhere, with any buffer limit: the same answer as aiosmtpd's reader.
_pieces = st.lists(
    st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b".\r\n", b"xy" * 40, b"w" * 1000])
)


@settings(max_examples=400, deadline=None)
@given(
    parts=_pieces,
    cuts=st.lists(st.integers(0, 400)),
    limit=st.sampled_from([8, 64, 2**16]),
    size_limit=st.sampled_from([300, 10**6]),
    mode=st.sampled_from(["normalize", "reject"]),
)
def test_matches_a_line_by_line_reader(parts, cuts, limit, size_limit, mode):
    stream = b"".join(parts) + b"\r\n.\r\nQUIT\r\n"
    points = sorted({c for c in cuts if c < len(stream)})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    got = run(pieces, size_limit=size_limit, limit=limit, mode=mode)
    assert got == reference(stream, size_limit, mode=mode)
    if isinstance(got[0], bytes):  # what is handed on has CRLF line endings only
        assert got[0].count(b"\r") == got[0].count(b"\n") == got[0].count(b"\r\n")


# The stream (--relay) and read_message share MessageReader; both must give what the
# whole-message reader gave before the stream existed, kept here as the oracle.


async def buffered_read_message(
    reader: asyncio.StreamReader, *, size_limit: int, line_limit: int, bare_newline: str
) -> bytes:
    """read_message as it was before MessageReader: the whole message, then the rules."""
    chunks: list[bytes] = []
    size = 0
    tail = b"\r\n"
    while True:
        try:
            chunk = await reader.readuntil(b".\r\n")
            complete = True
        except asyncio.LimitOverrunError as overrun:
            chunk = await reader.read(overrun.consumed)
            complete = False
        window = chunk[-5:] if len(chunk) >= 5 else (tail + chunk)[-5:]
        if complete and window == b"\r\n.\r\n":
            chunks.append(chunk[:-3])
            size += len(chunk) - 3
            break
        tail = chunk[-4:] if len(chunk) >= 4 else (tail + chunk)[-4:]
        size += len(chunk)
        if size <= size_limit:
            chunks.append(chunk)
        elif chunks:
            chunks.clear()
    if size > size_limit:
        raise TooBig
    message = b"".join(chunks)
    pairs = message.count(b"\r\n")
    if message.count(b"\n") != pairs or message.count(b"\r") != pairs:
        if bare_newline == "reject":
            raise BareNewline("<LF>" if message.count(b"\n") != pairs else "<CR>")
        message = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        if len(message) > size_limit:
            raise TooBig
    if len(message) >= line_limit and max(map(len, message.split(b"\r\n"))) > line_limit - 2:
        raise TooLong
    if message.startswith(b"."):
        message = message[1:]
    return message.replace(b"\r\n.", b"\r\n")


async def streamed(reader: asyncio.StreamReader, **limits: Any) -> bytes:
    """What --relay sends down, piece by piece, joined; each piece must be whole lines,
    and what is held between reads must stay under a line."""
    message = MessageReader(reader, **limits)
    pieces = []
    failed_at = None
    while not message.done:
        piece = await message.read()
        assert piece == b"" or piece.endswith(b"\r\n"), piece[-10:]
        assert len(message.carry) <= limits["line_limit"]
        if failed_at is not None:
            assert piece == b""  # nothing more goes down once it failed
        elif message.failed:
            failed_at = len(pieces)
        pieces.append(piece)
    assert failed_at is None  # a failed message raises at its end
    return b"".join(pieces)


def outcome(read: Callable[..., Awaitable[bytes]], pieces: list[bytes], **limits: Any) -> tuple:
    """(message or exception type and text, what is left for the next command)."""

    async def go() -> tuple:
        reader = asyncio.StreamReader(limit=limits.pop("limit"))

        async def feed() -> None:
            for piece in pieces:
                reader.feed_data(piece)
                await asyncio.sleep(0)
            reader.feed_eof()

        feeder = asyncio.create_task(feed())
        try:
            result: object = await read(reader, line_limit=LINE_LIMIT, **limits)
        except (TooBig, TooLong, BareNewline) as error:
            result = (type(error), str(error))
        except asyncio.IncompleteReadError:
            result = "eof"
        rest = await reader.read()
        await feeder
        return result, rest

    return asyncio.run(go())


def same_everywhere(pieces: list[bytes], **limits: Any) -> tuple:
    expected = outcome(buffered_read_message, pieces, **limits)
    assert outcome(read_message, pieces, **limits) == expected
    assert outcome(streamed, pieces, **limits) == expected
    return expected


def test_an_end_marker_or_a_crlf_split_across_reads() -> None:
    limits = {"limit": 2**16, "size_limit": 10**6, "bare_newline": "reject"}
    for pieces in (
        [b"a\r\n.", b"\r", b"\nQUIT\r\n"],
        [b"a\r\n", b".\r\n", b"QUIT\r\n"],
        [b"a\r", b"\n.\r\nQUIT\r\n"],
        [b"a\r", b"\n", b".", b"\r", b"\n", b"QUIT\r\n"],
    ):
        assert same_everywhere(pieces, **limits) == (b"a\r\n", b"QUIT\r\n")
    assert same_everywhere([b".", b"b\r\n..\r\n.\r\n"], **limits)[0] == b"b\r\n.\r\n"


def test_a_line_with_no_end_in_sight_is_not_held() -> None:
    # 1 MB without a newline: too long, and the stream never holds more than a line of it.
    pieces = [b"x" * 4096] * 256 + [b"\r\n.\r\nNOOP\r\n"]
    limits = {"limit": 8192, "size_limit": 10**7, "bare_newline": "normalize"}
    assert same_everywhere(pieces, **limits) == ((TooLong, ""), b"NOOP\r\n")


_stream_parts = st.lists(
    st.sampled_from(
        [b"a", b".", b"..", b"\r", b"\n", b"\r\n", b".\r\n", b"\r\n.", b"\n.\n", b"\r.\r",
         b"xy" * 40, b"w" * 998, b"w" * 1500, b"Subject: s\r\n"]
    ),
    max_size=60,
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(
    parts=_stream_parts,
    cuts=st.lists(st.integers(0, 6000), max_size=30),
    limit=st.sampled_from([8, 64, 1024, 2**16]),
    size_limit=st.sampled_from([300, 3000, 10**6]),
    mode=st.sampled_from(["normalize", "reject"]),
)
def test_the_stream_and_read_message_match_the_whole_message_reader(
    parts: list[bytes], cuts: list[int], limit: int, size_limit: int, mode: str
) -> None:
    stream = b"".join(parts) + b"\r\n.\r\nQUIT\r\n"
    points = sorted({c for c in cuts if c < len(stream)})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    same_everywhere(pieces, limit=limit, size_limit=size_limit, bare_newline=mode)
