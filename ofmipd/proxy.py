"""HAProxy PROXY protocol v1 and v2: who the client behind a trusted load balancer is.

The parser is a pure function of the bytes received so far (haproxy's
doc/proxy-protocol.txt); it answers "need more", an error, or the header and how
many bytes it took. read_proxy_header() is the only I/O here: it reads exactly the
header and leaves what follows it unread, so the header can be taken from the raw
socket before a TLS handshake (implicit TLS behind haproxy's send-proxy-v2).

A PROXY header is only honoured from peers in TrustedProxies: from anyone else it
would let a client choose its own address (spec section 7).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import struct
from dataclasses import dataclass
from typing import Protocol

from ofmipd import identity
from ofmipd.identity import ClientIdentity

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest legal line, CRLF included (spec 2.1)
MIN_HEADER = 15  # "PROXY UNKNOWN\r\n"; a v2 header is at least 16

PROXY = "PROXY"
LOCAL = "LOCAL"  # v2 health check from the proxy itself: use the real peer

# Address families, one vocabulary for both versions.
INET = "inet"
INET6 = "inet6"
UNIX = "unix"
UNSPEC = "unspec"  # v1 UNKNOWN, v2 AF_UNSPEC, or a v2 protocol other than STREAM

_V2_FAMILIES = {0: UNSPEC, 1: INET, 2: INET6, 3: UNIX}
_V2_ADDRESS_LENGTH = {INET: 12, INET6: 36, UNIX: 216}
_V2_STREAM = 1

_V4_TEXT = re.compile(r"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")  # no leading 0s
_V6_TEXT = re.compile(r"[0-9A-Fa-f:.]{2,45}")  # inet_ntop output; no zone index
_PORT_TEXT = re.compile(r"0|[1-9][0-9]{0,4}")


@dataclass(frozen=True)
class ProxyHeader:
    """A complete, valid header. Addresses are None for LOCAL and when the proxy gave none."""

    version: int  # 1 or 2
    consumed: int  # bytes of the connection the header occupied
    command: str  # PROXY or LOCAL
    family: str  # INET, INET6, UNIX or UNSPEC
    src_ip: str | None = None
    src_port: int | None = None
    dst_ip: str | None = None
    dst_port: int | None = None

    def describe(self) -> str:
        if self.command == LOCAL:
            return f"PROXY v{self.version} LOCAL (the proxy's own connection)"
        if self.src_ip is None:
            return f"PROXY v{self.version} {self.family}: client address not given"
        return (
            f"PROXY v{self.version} {self.src_ip} port {self.src_port}"
            f" -> {self.dst_ip} port {self.dst_port}"
        )


@dataclass(frozen=True)
class NeedMore:
    """The bytes so far are a valid beginning; at least `at_least` more are needed.

    Reading exactly that many can never swallow data sent after the header.
    """

    at_least: int


@dataclass(frozen=True)
class ProxyError:
    reason: str  # short, for the log; never echoes the received bytes


ParseResult = ProxyHeader | NeedMore | ProxyError


def parse_proxy_header(data: bytes) -> ParseResult:
    """Parse the start of a connection; never raises for any input."""
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if data.startswith(V1_PREFIX):
        return _parse_v1(data)
    if V2_SIGNATURE.startswith(data[:12]) or V1_PREFIX.startswith(data[:6]):
        # a prefix of one of the signatures (the longer the data, the shorter the prefix)
        return NeedMore(max(MIN_HEADER - len(data), 1))
    return ProxyError("not a PROXY protocol header")


def _parse_v1(data: bytes) -> ParseResult:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if b"\n" in data[:V1_MAX] or b"\r" in data[: min(len(data), V1_MAX) - 1]:
            return ProxyError("v1: bare CR or LF in header line")
        if len(data) >= V1_MAX:
            return ProxyError(f"v1: no CRLF in the first {V1_MAX} bytes")
        return NeedMore(max(MIN_HEADER - len(data), 1))
    consumed = end + 2
    if data[:end] == b"PROXY UNKNOWN" or data[:end].startswith(b"PROXY UNKNOWN "):
        # the receiver must ignore anything after UNKNOWN; no client address is given
        return ProxyHeader(1, consumed, PROXY, UNSPEC)
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError:
        return ProxyError("v1: non-ASCII bytes in header line")
    fields = line.split(" ")  # exactly one space between fields: doubles give empty fields
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        return ProxyError("v1: expected PROXY TCP4|TCP6|UNKNOWN SRC DST SPORT DPORT")
    family = INET if fields[1] == "TCP4" else INET6
    src_ip, dst_ip = _v1_address(fields[2], family), _v1_address(fields[3], family)
    src_port, dst_port = _v1_port(fields[4]), _v1_port(fields[5])
    if src_ip is None or dst_ip is None:
        return ProxyError(f"v1: invalid {fields[1]} address")
    if src_port is None or dst_port is None:
        return ProxyError("v1: invalid port")
    return ProxyHeader(1, consumed, PROXY, family, src_ip, src_port, dst_ip, dst_port)


def _v1_address(text: str, family: str) -> str | None:
    try:
        if family == INET:
            if not _V4_TEXT.fullmatch(text):
                return None
            return str(ipaddress.IPv4Address(text))
        if not _V6_TEXT.fullmatch(text):
            return None
        return identity.normalise_ip(str(ipaddress.IPv6Address(text)))
    except ValueError:
        return None


def _v1_port(text: str) -> int | None:
    if not _PORT_TEXT.fullmatch(text):
        return None
    port = int(text)
    return port if port <= 65535 else None


def _parse_v2(data: bytes) -> ParseResult:
    if len(data) >= 13:
        version, command = data[12] >> 4, data[12] & 0x0F
        if version != 2:
            return ProxyError(f"v2: unsupported version {version}")
        if command not in (0, 1):
            return ProxyError(f"v2: unknown command {command}")
        # LOCAL must be accepted whatever its family byte says (spec 2.2), so check only PROXY
        if len(data) >= 14 and command == 1:
            if data[13] >> 4 not in _V2_FAMILIES or data[13] & 0x0F > 2:
                return ProxyError(f"v2: unknown family/protocol 0x{data[13]:02x}")
    if len(data) < 16:
        return NeedMore(16 - len(data))
    # The 16-bit length bounds the whole header to 16 + 65535 bytes; TLVs ride in it.
    (length,) = struct.unpack_from("!H", data, 14)
    total = 16 + length
    if len(data) < total:
        return NeedMore(total - len(data))
    if data[12] & 0x0F == 0:
        return ProxyHeader(2, total, LOCAL, UNSPEC)  # addresses, if any, must be ignored
    family = _V2_FAMILIES[data[13] >> 4]
    needed = _V2_ADDRESS_LENGTH.get(family, 0)
    if length < needed:
        return ProxyError(f"v2: {length}-byte address block too short for {family}")
    if family not in (INET, INET6) or data[13] & 0x0F != _V2_STREAM:
        # UNIX sockets or datagrams: no address an SMTP session can use; the spec lets a
        # receiver treat combinations it does not implement as UNSPEC.
        return ProxyHeader(2, total, PROXY, UNSPEC if family != UNIX else UNIX)
    size = 4 if family == INET else 16
    src = ipaddress.ip_address(data[16 : 16 + size])
    dst = ipaddress.ip_address(data[16 + size : 16 + 2 * size])
    src_port, dst_port = struct.unpack_from("!HH", data, 16 + 2 * size)
    return ProxyHeader(
        2,
        total,
        PROXY,
        family,
        identity.normalise_ip(str(src)),
        src_port,
        identity.normalise_ip(str(dst)),
        dst_port,
    )


class ExactReader(Protocol):
    async def readexactly(self, n: int) -> bytes: ...


class SocketReader:
    """readexactly() straight from a non-blocking socket, with no buffer of its own:
    what follows the header (a TLS ClientHello, SMTP commands) stays in the socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    async def readexactly(self, n: int) -> bytes:
        loop = asyncio.get_running_loop()
        data = b""
        while len(data) < n:
            chunk = await loop.sock_recv(self.sock, n - len(data))
            if not chunk:
                raise asyncio.IncompleteReadError(data, n)
            data += chunk
        return data


# ASYNC109: the timeout becomes a ProxyError that says how many bytes came, for the log.
async def read_proxy_header(
    reader: ExactReader,
    timeout: float,  # noqa: ASYNC109
) -> ProxyHeader | ProxyError:
    """Read exactly one header from the connection, or say why not.

    Only ever asks for the bytes the parser says a valid header still needs
    (readexactly), so whatever the client sent behind the header stays unread: SMTP
    commands in a StreamReader, or a TLS ClientHello in the socket (SocketReader).
    A v1 line therefore arrives a byte at a time after its first 15; it is at most
    107 bytes long, so that costs at most 92 reads.
    """
    data = b""
    try:
        async with asyncio.timeout(timeout):
            while True:
                result = parse_proxy_header(data)
                if not isinstance(result, NeedMore):
                    return result
                data += await reader.readexactly(result.at_least)
    except TimeoutError:
        return ProxyError(f"no complete PROXY header within {timeout:.3g}s ({len(data)} bytes)")
    except asyncio.IncompleteReadError as error:
        return ProxyError(f"connection closed after {len(data) + len(error.partial)} bytes")
    except (ConnectionError, OSError) as error:
        return ProxyError(f"connection error: {type(error).__name__}")


def apply_proxy(transport: ClientIdentity, header: ProxyHeader) -> ClientIdentity:
    """The client as the proxy saw it.

    LOCAL is the proxy's own health check: the transport identity stays as it is
    (callers may log header.describe()). A relayed connection the proxy could not
    name (v1 UNKNOWN, v2 AF_UNSPEC, AF_UNIX, datagrams) becomes an unknown client
    rather than the proxy itself, which the spec would allow: otherwise anyone
    reaching haproxy over a UNIX socket would inherit the proxy's host rule
    (typically "127.0.0.1 relay").
    """
    if header.command == LOCAL:
        return transport
    return transport.with_changes(
        ip=header.src_ip or "",
        port=header.src_port,
        hostname=None,  # a name the launcher found belongs to the proxy, not the client
        local_ip=header.dst_ip or transport.local_ip,
        local_port=header.dst_port if header.dst_ip else transport.local_port,
        source=identity.PROXY_V1 if header.version == 1 else identity.PROXY_V2,
        peer_ip=transport.peer_ip or transport.ip,
    )


class TrustedProxies(identity.Networks):
    """The peers whose PROXY header is believed (--proxy-protocol CIDR[,CIDR...])."""

    __slots__ = ()
    option = "--proxy-protocol"
