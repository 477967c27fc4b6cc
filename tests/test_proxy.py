"""PROXY protocol parsing as a pure function, the StreamReader helper, trust and identity."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ofmipd import identity
from ofmipd.errors import ConfigError
from ofmipd.identity import ClientIdentity
from ofmipd.proxy import (
    INET,
    INET6,
    LOCAL,
    PROXY,
    UNIX,
    UNSPEC,
    V2_SIGNATURE,
    NeedMore,
    ProxyError,
    ProxyHeader,
    TrustedProxies,
    apply_proxy,
    parse_proxy_header,
    read_proxy_header,
)

SMTP = b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\n"


def v2(
    command: int = 1,
    family: int = 1,
    protocol: int = 1,
    addresses: bytes = b"",
    tlvs: bytes = b"",
    version: int = 2,
) -> bytes:
    """A v2 header packed by hand from the spec's struct proxy_hdr_v2."""
    body = addresses + tlvs
    return (
        V2_SIGNATURE
        + struct.pack("!BBH", (version << 4) | command, (family << 4) | protocol, len(body))
        + body
    )


def v4_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)


def v6_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


# ---- version 1 -------------------------------------------------------------------------


def test_v1_tcp4_gives_addresses_and_consumed_length() -> None:
    line = b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 587\r\n"
    header = parse_proxy_header(line + SMTP)
    assert header == ProxyHeader(
        1, len(line), PROXY, INET, "192.0.2.10", 56324, "198.51.100.1", 587
    )


def test_v1_tcp6_gives_canonical_addresses() -> None:
    line = b"PROXY TCP6 2001:DB8:0:0::1 2001:db8::ffff 65535 25\r\n"
    header = parse_proxy_header(line)
    assert isinstance(header, ProxyHeader)
    assert (header.family, header.src_ip, header.dst_ip) == (INET6, "2001:db8::1", "2001:db8::ffff")
    assert (header.src_port, header.dst_port, header.consumed) == (65535, 25, len(line))


def test_v1_tcp6_ipv4_mapped_source_is_normalised() -> None:
    header = parse_proxy_header(b"PROXY TCP6 ::ffff:192.0.2.7 ::1 1000 25\r\n")
    assert isinstance(header, ProxyHeader)
    assert header.src_ip == "192.0.2.7"


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN ffff:: ffff:: 65535 65535\r\n",
        b"PROXY UNKNOWN \xff\r\n",
    ],
)
def test_v1_unknown_gives_no_address(line: bytes) -> None:
    header = parse_proxy_header(line + SMTP)
    assert header == ProxyHeader(1, len(line), PROXY, UNSPEC)


def test_v1_longest_legal_line_is_accepted() -> None:
    six = "ffff:" * 7 + "ffff"
    line = f"PROXY UNKNOWN {six} {six} 65535 65535\r\n".encode()
    assert len(line) == 107
    assert isinstance(parse_proxy_header(line), ProxyHeader)
    tcp6 = f"PROXY TCP6 {six} {six} 65535 65535\r\n".encode()
    assert isinstance(parse_proxy_header(tcp6), ProxyHeader)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n",  # bare LF
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\rX",  # bare CR
        b"PROXY TCP4 192.0.2.1  192.0.2.2 1 2\r\n",  # two spaces
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 \r\n",  # trailing space
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n",  # a field missing
        b"PROXY TCP5 192.0.2.1 192.0.2.2 1 2\r\n",  # unknown protocol
        b"PROXY tcp4 192.0.2.1 192.0.2.2 1 2\r\n",  # keywords are upper case
        b"PROXY TCP4 192.0.2.01 192.0.2.2 1 2\r\n",  # leading zero (octal confusion)
        b"PROXY TCP4 192.0.2.256 192.0.2.2 1 2\r\n",
        b"PROXY TCP4 192.0.2 192.0.2.2 1 2\r\n",
        b"PROXY TCP4 ::1 192.0.2.2 1 2\r\n",  # family mismatch
        b"PROXY TCP6 192.0.2.1 ::1 1 2\r\n",
        b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",  # zone index
        b"PROXY TCP6 1::2::3 ::1 1 2\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 2\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 01 2\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 -1 2\r\n",
        b"PROXY TCP4 192.0.2.1 192.0.2.2 +1 2\r\n",
        b"PROXY TCP4 \xc0.0.2.1 192.0.2.2 1 2\r\n",
        b"PROXY " + b"A" * 101,  # no CRLF within 107 bytes
        b"PROXY TCP4 " + b"1" * 94 + b"\r\n",  # CRLF at byte 108: one too many
        b"EHLO client.example\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"proxy TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
    ],
)
def test_v1_malformed_lines_are_errors(line: bytes) -> None:
    result = parse_proxy_header(line)
    assert isinstance(result, ProxyError), result
    assert result.reason


# ---- version 2 -------------------------------------------------------------------------


def test_v2_tcp_over_ipv4() -> None:
    raw = v2(addresses=v4_block("192.0.2.10", "198.51.100.1", 56324, 587))
    header = parse_proxy_header(raw + SMTP)
    assert header == ProxyHeader(2, 28, PROXY, INET, "192.0.2.10", 56324, "198.51.100.1", 587)


def test_v2_tcp_over_ipv6() -> None:
    raw = v2(family=2, addresses=v6_block("2001:db8::1", "2001:db8::2", 40000, 465))
    header = parse_proxy_header(raw + SMTP)
    assert header == ProxyHeader(2, 52, PROXY, INET6, "2001:db8::1", 40000, "2001:db8::2", 465)


def test_v2_ipv4_mapped_ipv6_is_normalised() -> None:
    raw = v2(family=2, addresses=v6_block("::ffff:192.0.2.9", "::ffff:192.0.2.1", 1, 25))
    header = parse_proxy_header(raw)
    assert isinstance(header, ProxyHeader)
    assert (header.src_ip, header.dst_ip) == ("192.0.2.9", "192.0.2.1")


def test_v2_tlvs_are_skipped() -> None:
    tlvs = tlv(0x01, b"smtp") + tlv(0x04, b"\x00" * 4) + tlv(0x20, b"\x01" + b"\x00" * 4)
    raw = v2(addresses=v4_block("192.0.2.10", "192.0.2.1", 5, 25), tlvs=tlvs)
    header = parse_proxy_header(raw + SMTP)
    assert isinstance(header, ProxyHeader)
    assert header.consumed == len(raw) and header.src_ip == "192.0.2.10"


def test_v2_largest_header_is_accepted() -> None:
    addresses = v4_block("192.0.2.10", "192.0.2.1", 5, 25)
    raw = v2(addresses=addresses, tlvs=tlv(0xEE, b"x" * (65535 - len(addresses) - 3)))
    assert len(raw) == 16 + 65535
    header = parse_proxy_header(raw + SMTP)
    assert isinstance(header, ProxyHeader) and header.consumed == len(raw)


def test_v2_local_means_real_peer_whatever_follows() -> None:
    for raw in (v2(command=0, family=0, protocol=0), v2(command=0, family=0xF, tlvs=b"junk")):
        assert parse_proxy_header(raw + SMTP) == ProxyHeader(2, len(raw), LOCAL, UNSPEC)


@pytest.mark.parametrize(
    ("family", "protocol", "addresses", "expected"),
    [
        (0, 0, b"", UNSPEC),
        (1, 2, v4_block("192.0.2.1", "192.0.2.2", 53, 53), UNSPEC),  # UDP
        (3, 1, b"/run/a".ljust(108, b"\0") + b"/run/b".ljust(108, b"\0"), UNIX),
    ],
)
def test_v2_unusable_families_give_no_address(
    family: int, protocol: int, addresses: bytes, expected: str
) -> None:
    raw = v2(family=family, protocol=protocol, addresses=addresses)
    header = parse_proxy_header(raw)
    assert header == ProxyHeader(2, len(raw), PROXY, expected)


@pytest.mark.parametrize(
    "raw",
    [
        v2(version=1, addresses=v4_block("192.0.2.1", "192.0.2.2", 1, 2)),
        v2(command=2, addresses=v4_block("192.0.2.1", "192.0.2.2", 1, 2)),
        v2(family=4, addresses=v4_block("192.0.2.1", "192.0.2.2", 1, 2)),
        v2(protocol=3, addresses=v4_block("192.0.2.1", "192.0.2.2", 1, 2)),
        v2(addresses=b"\x00" * 11),  # too short for IPv4
        v2(family=2, addresses=v4_block("192.0.2.1", "192.0.2.2", 1, 2)),  # too short for IPv6
        v2(family=3, addresses=b"\x00" * 215),
        b"\r\n\r\n\x00\r\nQUIX\n" + b"\x21\x11\x00\x0c" + b"\x00" * 12,
    ],
)
def test_v2_malformed_headers_are_errors(raw: bytes) -> None:
    assert isinstance(parse_proxy_header(raw), ProxyError)


def test_v2_bad_version_is_refused_before_the_length_arrives() -> None:
    assert isinstance(parse_proxy_header(V2_SIGNATURE + b"\x11"), ProxyError)


# ---- truncation ------------------------------------------------------------------------

VALID = [
    b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 587\r\n",
    b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n",
    b"PROXY UNKNOWN\r\n",
    v2(addresses=v4_block("192.0.2.10", "198.51.100.1", 56324, 587)),
    v2(family=2, addresses=v6_block("2001:db8::1", "2001:db8::2", 40000, 465)),
    v2(command=0, family=0, protocol=0),
    v2(addresses=v4_block("192.0.2.10", "192.0.2.1", 5, 25), tlvs=tlv(1, b"h2") + tlv(2, b"x")),
]


@pytest.mark.parametrize("raw", VALID)
def test_every_truncation_needs_more_and_never_overreads(raw: bytes) -> None:
    for length in range(len(raw)):
        result = parse_proxy_header(raw[:length])
        assert isinstance(result, NeedMore), (length, result)
        # asking for at_least more bytes must never reach into the data after the header
        assert 1 <= result.at_least <= len(raw) - length
    header = parse_proxy_header(raw + SMTP)
    assert isinstance(header, ProxyHeader) and header.consumed == len(raw)


# ---- property tests --------------------------------------------------------------------


def _check_result(data: bytes) -> None:
    result = parse_proxy_header(data)
    assert isinstance(result, ProxyHeader | NeedMore | ProxyError)
    if isinstance(result, ProxyHeader):
        assert 15 <= result.consumed <= len(data)
        assert parse_proxy_header(data[: result.consumed]) == result
    if isinstance(result, NeedMore):
        assert result.at_least >= 1


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_give_only_declared_results(data: bytes) -> None:
    _check_result(data)


@settings(max_examples=2000, deadline=None)
@given(
    st.sampled_from([V2_SIGNATURE, b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN"]),
    st.binary(max_size=300),
)
def test_arbitrary_bytes_after_a_signature_give_only_declared_results(
    prefix: bytes, data: bytes
) -> None:
    _check_result(prefix + data)


@settings(max_examples=500, deadline=None)
@given(
    st.ip_addresses(),
    st.ip_addresses(),
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4),
    st.binary(max_size=40),
)
def test_packed_v2_headers_round_trip(
    src: ipaddress.IPv4Address | ipaddress.IPv6Address,
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address,
    sport: int,
    dport: int,
    tlvs: list[tuple[int, bytes]],
    after: bytes,
) -> None:
    if src.version != dst.version:
        dst = src
    block = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    raw = v2(
        family=1 if src.version == 4 else 2,
        addresses=block,
        tlvs=b"".join(tlv(kind, value) for kind, value in tlvs),
    )
    header = parse_proxy_header(raw + after)
    assert isinstance(header, ProxyHeader)
    assert header.consumed == len(raw)
    assert header.src_ip == identity.normalise_ip(str(src))
    assert header.dst_ip == identity.normalise_ip(str(dst))
    assert (header.src_port, header.dst_port) == (sport, dport)


@settings(max_examples=500, deadline=None)
@given(st.ip_addresses(), st.ip_addresses(), st.integers(0, 65535), st.integers(0, 65535))
def test_v1_lines_round_trip(
    src: ipaddress.IPv4Address | ipaddress.IPv6Address,
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address,
    sport: int,
    dport: int,
) -> None:
    if src.version != dst.version:
        dst = src
    line = f"PROXY TCP{src.version} {src} {dst} {sport} {dport}\r\n".encode()
    header = parse_proxy_header(line + SMTP)
    assert isinstance(header, ProxyHeader)
    assert header.consumed == len(line)
    assert header.src_ip == identity.normalise_ip(str(src))
    assert (header.src_port, header.dst_port) == (sport, dport)


# ---- read_proxy_header on a StreamReader -----------------------------------------------


def _read_from_feed(chunks: list[bytes], eof: bool = False, timeout: float = 5.0):
    async def run() -> tuple[object, bytes]:
        reader = asyncio.StreamReader()
        for chunk in chunks:
            reader.feed_data(chunk)
        if eof:
            reader.feed_eof()
        result = await read_proxy_header(reader, timeout)
        rest = reader._buffer.copy() if not eof else await reader.read()
        return result, bytes(rest)

    return asyncio.run(run())


@pytest.mark.parametrize("raw", VALID)
def test_reader_leaves_pipelined_smtp_bytes(raw: bytes) -> None:
    result, rest = _read_from_feed([raw + SMTP], eof=True)
    assert isinstance(result, ProxyHeader) and result.consumed == len(raw)
    assert rest == SMTP


def test_reader_with_nothing_after_short_v1_header_does_not_wait() -> None:
    result, rest = _read_from_feed([b"PROXY UNKNOWN\r\n"], timeout=2.0)
    assert isinstance(result, ProxyHeader) and rest == b""


def test_reader_reports_timeout_on_incomplete_header() -> None:
    result, _ = _read_from_feed([b"PROXY TCP4 192.0.2.1"], timeout=0.2)
    assert isinstance(result, ProxyError) and "within" in result.reason


def test_reader_reports_early_close() -> None:
    result, _ = _read_from_feed([V2_SIGNATURE + b"\x21\x11\x00\x0c\x01"], eof=True)
    assert isinstance(result, ProxyError) and "closed" in result.reason


def test_reader_reports_garbage_without_consuming_more_than_15_bytes() -> None:
    result, rest = _read_from_feed([b"EHLO client.example\r\n"])
    assert isinstance(result, ProxyError) and "not a PROXY" in result.reason
    assert rest == b"mple\r\n"


def test_reader_on_a_real_socket_with_the_header_split_across_segments() -> None:
    raw = v2(family=2, addresses=v6_block("2001:db8::5", "::1", 4321, 25), tlvs=tlv(1, b"smtp"))
    seen: asyncio.Queue[tuple[object, bytes]] = asyncio.Queue()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        result = await read_proxy_header(reader, 10.0)
        await seen.put((result, await reader.readline()))
        writer.close()

    async def run() -> tuple[object, bytes]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            for piece in (raw[:3], raw[3:14], raw[14:17], raw[17:] + SMTP[:5], SMTP[5:]):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.02)
            result = await asyncio.wait_for(seen.get(), 20)
            writer.close()
            return result

    header, line = asyncio.run(run())
    assert isinstance(header, ProxyHeader) and header.src_ip == "2001:db8::5"
    assert line == b"EHLO client.example\r\n"


# ---- identity and trust ----------------------------------------------------------------


def test_apply_proxy_takes_source_and_destination_and_keeps_peer(client: ClientIdentity) -> None:
    client = client.with_changes(hostname="proxy.example")
    header = parse_proxy_header(b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 587\r\n")
    assert isinstance(header, ProxyHeader)
    seen = apply_proxy(client, header)
    assert (seen.ip, seen.port, seen.local_ip, seen.local_port) == (
        "192.0.2.10",
        56324,
        "198.51.100.1",
        587,
    )
    assert seen.source == identity.PROXY_V1 and seen.peer_ip == "127.0.0.1"
    assert seen.hostname is None
    raw = v2(addresses=v4_block("192.0.2.10", "198.51.100.1", 1, 2))
    v2_header = parse_proxy_header(raw)
    assert isinstance(v2_header, ProxyHeader)
    assert apply_proxy(client, v2_header).source == identity.PROXY_V2


def test_apply_proxy_keeps_transport_for_local(client: ClientIdentity) -> None:
    header = parse_proxy_header(v2(command=0, family=0, protocol=0))
    assert isinstance(header, ProxyHeader)
    assert apply_proxy(client, header) is client
    assert "LOCAL" in header.describe()


@pytest.mark.parametrize(
    ("raw", "source"),
    [
        (b"PROXY UNKNOWN\r\n", identity.PROXY_V1),
        (v2(family=0, protocol=0), identity.PROXY_V2),
        (v2(family=3, addresses=bytes(216)), identity.PROXY_V2),
    ],
)
def test_apply_proxy_makes_unnamed_relayed_client_unknown(
    client: ClientIdentity, raw: bytes, source: str
) -> None:
    header = parse_proxy_header(raw)
    assert isinstance(header, ProxyHeader)
    seen = apply_proxy(client, header)
    # not the proxy's own address: that would hand the client the proxy's host rule
    assert (seen.ip, seen.port, seen.source, seen.peer_ip) == ("", None, source, "127.0.0.1")
    assert (seen.local_ip, seen.local_port) == (client.local_ip, client.local_port)
    assert "not given" in header.describe()


def test_trusted_proxies_match_addresses_and_networks() -> None:
    trusted = TrustedProxies.parse("127.0.0.1, 10.0.0.0/8,::1,2001:db8::/32")
    assert trusted.contains("127.0.0.1") and trusted.contains("10.200.3.4")
    assert trusted.contains("::ffff:10.1.1.1")  # IPv4-mapped peer on a dual-stack socket
    assert trusted.contains("::1") and trusted.contains("2001:db8:ffff::1")
    assert not trusted.contains("127.0.0.2")
    assert not trusted.contains("11.0.0.1")
    assert not trusted.contains("")
    assert not trusted.contains("not-an-ip")
    assert TrustedProxies.parse(["192.0.2.0/24"]).contains("192.0.2.200")


def test_trusted_proxies_mapped_network_matches_ipv4_peer() -> None:
    assert TrustedProxies.parse("::ffff:10.0.0.0/104").contains("10.9.9.9")


@pytest.mark.parametrize("spec", ["", " , ", "10.0.0.1/8", "localhost", "10.0.0.0/33", "1.2.3"])
def test_trusted_proxies_reject_bad_entries(spec: str) -> None:
    with pytest.raises(ConfigError) as error:
        TrustedProxies.parse(spec)
    assert str(error.value).startswith("--proxy-protocol")
