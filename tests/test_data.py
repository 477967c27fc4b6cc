"""ofmipd/data.py: the chunked DATA reader gives what a line-by-line RFC 5321 reader gives."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ofmipd.data import TooBig, TooLong, read_message

LINE_LIMIT = 1001  # aiosmtpd's line_length_limit, CRLF included


def reference(stream: bytes, size_limit: int, line_limit: int = LINE_LIMIT) -> tuple[object, bytes]:
    """aiosmtpd 1.4's algorithm, one CRLF-terminated line at a time: (result, rest of stream).

    Where a message is both too big and has a long line, the size is what the client hears.
    """
    lines, size, pos, long_line = [], 0, 0, False
    while True:
        end = stream.find(b"\r\n", pos)
        if end < 0:
            return "eof", b""
        line = stream[pos : end + 2]
        pos = end + 2
        if line == b".\r\n":
            break
        size += len(line)
        long_line = long_line or len(line) > line_limit
        lines.append(line[1:] if line.startswith(b".") else line)
    if size > size_limit:
        return TooBig, stream[pos:]
    if long_line:
        return TooLong, stream[pos:]
    return b"".join(lines), stream[pos:]


def run(pieces: list[bytes], size_limit: int = 10**6, limit: int = 2**16) -> tuple[object, bytes]:
    async def go() -> tuple[object, bytes]:
        reader = asyncio.StreamReader(limit=limit)

        async def feed() -> None:
            for piece in pieces:
                reader.feed_data(piece)
                await asyncio.sleep(0)
            reader.feed_eof()

        feeder = asyncio.create_task(feed())
        try:
            result: object = await read_message(
                reader, size_limit=size_limit, line_limit=LINE_LIMIT
            )
        except (TooBig, TooLong) as error:
            result = type(error)
        except asyncio.IncompleteReadError:
            result = "eof"
        rest = await reader.read()
        await feeder
        return result, rest

    return asyncio.run(go())


def test_message_ends_at_crlf_dot_crlf_and_leaves_the_next_command():
    message = b"Subject: hi\r\n\r\nbody.\r\n"
    assert run([message + b".\r\nQUIT\r\n"]) == (message, b"QUIT\r\n")


def test_empty_message_and_a_lone_dot_line_first():
    assert run([b".\r\nQUIT\r\n"]) == (b"", b"QUIT\r\n")
    assert run([b"x\r\n.\r\nNOOP\r\n"]) == (b"x\r\n", b"NOOP\r\n")


def test_dots_at_line_starts_are_unstuffed():
    stream = b"..first\r\n.second\r\n...\r\nmid.dle\r\n..\r\n.\r\n"
    assert run([stream])[0] == b".first\r\nsecond\r\n..\r\nmid.dle\r\n.\r\n"


@pytest.mark.parametrize(
    "fake_end", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\n. \r\n"]
)
def test_bare_lf_or_cr_dot_never_ends_the_message(fake_end):
    # SMTP smuggling: anything but <CRLF>.<CRLF> is message content.
    stream = b"a" + fake_end + b"MAIL FROM:<x@y>\r\n.\r\nQUIT\r\n"
    result, rest = run([stream])
    assert rest == b"QUIT\r\n"
    assert isinstance(result, bytes) and b"MAIL FROM:<x@y>" in result


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
)
def test_matches_a_line_by_line_reader(parts, cuts, limit, size_limit):
    stream = b"".join(parts) + b"\r\n.\r\nQUIT\r\n"
    points = sorted({c for c in cuts if c < len(stream)})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert run(pieces, size_limit=size_limit, limit=limit) == reference(stream, size_limit)
