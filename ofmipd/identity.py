"""Who the client is: one frozen ClientIdentity per connection, built before the banner.

Nothing else in ofmipd derives a client address. The builders are pure functions
of a socket's addresses or of the launcher's environment, so each launch mode is
tested without a network.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple, Self

from ofmipd.errors import ConfigError

# Where the identity came from, most trusted first.
SOCKET = "socket"
PROXY_V1 = "proxy-v1"
PROXY_V2 = "proxy-v2"
UCSPI_ENV = "ucspi-env"
XINETD_ENV = "xinetd-env"
SYSTEMD_ENV = "systemd-env"
UNKNOWN = "unknown"


class ClientIdentity(NamedTuple):
    ip: str  # "" when unknown (a pipe with no launcher environment)
    port: int | None = None
    hostname: str | None = None  # reverse name, when the launcher or a lookup gave one
    local_ip: str = ""
    local_port: int | None = None
    source: str = UNKNOWN
    peer_ip: str = ""  # the transport peer: differs from ip behind PROXY or a launcher
    relay_client: bool = False  # tcprules RELAYCLIENT: may send without AUTH
    tls_in_front: bool = False  # a TLS terminator (stunnel) encrypted the channel
    tls: bool = False  # TLS is up on this connection (implicit TLS or after STARTTLS)

    @property
    def is_loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.ip).is_loopback
        except ValueError:
            return False

    def with_changes(self, **changes: Any) -> ClientIdentity:
        return self._replace(**changes)

    def describe(self) -> str:
        where = f"[{self.ip}]" if self.ip else "[unknown]"
        if self.hostname:
            where = f"{self.hostname} {where}"
        return where


def normalise_ip(text: str | None) -> str:
    """Canonical text of an address; IPv4-mapped IPv6 becomes plain IPv4."""
    if not text:
        return ""
    text = text.strip().strip("[]")
    if "%" in text:  # drop an IPv6 zone index
        text = text.split("%", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return ""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(address)


@functools.lru_cache(maxsize=4096)
def address_group(ip: str) -> str:
    """What one client holds, for counting: an IPv4 address, or an IPv6 /64, since one
    host or subscriber is given a whole /64 and can rotate through it at will."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Networks:
    """Addresses matched against a list of CIDR networks: the peers a setting trusts
    (--proxy-protocol, --tls-in-front). Peers arrive normalised, so IPv4-mapped IPv6
    networks are stored as IPv4."""

    __slots__ = ("networks",)
    option = "networks"  # the setting's name, for error messages

    def __init__(self, networks: Iterable[IPNetwork]) -> None:
        self.networks = tuple(networks)

    @classmethod
    def parse(cls, spec: str | Iterable[str], option: str | None = None) -> Self:
        option = option or cls.option
        entries = spec.split(",") if isinstance(spec, str) else list(spec)
        networks = []
        for raw in entries:
            entry = raw.strip()
            if not entry:
                continue
            try:
                network = ipaddress.ip_network(entry, strict=True)
            except ValueError as error:
                raise ConfigError(f"{option}: {error}") from None
            networks.append(_unmapped(network))
        if not networks:
            raise ConfigError(f"{option}: no addresses given")
        return cls(networks)

    def contains(self, ip: str) -> bool:
        text = normalise_ip(ip)
        if not text:
            return False
        address = ipaddress.ip_address(text)
        return any(address in network for network in self.networks)

    def __str__(self) -> str:
        return ",".join(str(network) for network in self.networks)


def _unmapped(network: IPNetwork) -> IPNetwork:
    """::ffff:a.b.c.d/120 as a.b.c.d/24, since client addresses arrive normalised."""
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _port(text: object) -> int | None:
    try:
        port = int(str(text))
    except (TypeError, ValueError):
        return None
    return port if 0 <= port <= 65535 else None


def _split_sockaddr(addr: object) -> tuple[str, int | None]:
    if isinstance(addr, tuple) and len(addr) == 2 and _is_dotted_quad(addr[0]):
        return addr[0], _port(addr[1])  # AF_INET: the kernel's text is already canonical
    if isinstance(addr, tuple) and len(addr) >= 2:
        return normalise_ip(str(addr[0])), _port(addr[1])
    return "", None  # AF_UNIX socketpair, pipe


def _is_dotted_quad(text: object) -> bool:
    # Skips ipaddress (about 5 us, twice per connection) for what inet_ntop gives for IPv4.
    if not isinstance(text, str):
        return False
    try:
        return socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, text)) == text
    except OSError:
        return False


def from_socket(peer: object, local: object) -> ClientIdentity:
    ip, port = _split_sockaddr(peer)
    local_ip, local_port = _split_sockaddr(local)
    return ClientIdentity(
        ip=ip,
        port=port,
        local_ip=local_ip,
        local_port=local_port,
        source=SOCKET if ip else UNKNOWN,
        peer_ip=ip,
    )


def from_environment(env: Mapping[str, str], transport: ClientIdentity) -> ClientIdentity:
    """One-session mode: the launcher's variables describe the real client.

    ucspi-tcp (tcpserver) sets TCPREMOTEIP & co; xinetd and stunnel set
    REMOTE_HOST (an address despite the name) and stunnel REMOTE_PORT; systemd
    socket units with Accept=yes set REMOTE_ADDR and REMOTE_PORT.
    """
    relay = "RELAYCLIENT" in env
    ucspi_ip = normalise_ip(env.get("TCPREMOTEIP"))
    if ucspi_ip:
        return transport._replace(
            ip=ucspi_ip,
            port=_port(env.get("TCPREMOTEPORT")),
            hostname=env.get("TCPREMOTEHOST") or None,
            local_ip=normalise_ip(env.get("TCPLOCALIP")) or transport.local_ip,
            local_port=_port(env.get("TCPLOCALPORT")) or transport.local_port,
            source=UCSPI_ENV,
            relay_client=relay,
        )
    for var, source in (("REMOTE_HOST", XINETD_ENV), ("REMOTE_ADDR", SYSTEMD_ENV)):
        ip = normalise_ip(env.get(var))
        if ip:
            return transport._replace(
                ip=ip,
                port=_port(env.get("REMOTE_PORT")),
                source=source,
                relay_client=relay,
            )
    return transport._replace(relay_client=relay)


def with_tls_in_front(
    client: ClientIdentity, terminators: Networks | None, *, ip_peer: bool
) -> ClientIdentity:
    """--tls-in-front: believe the channel is encrypted only when the transport peer is
    a trusted TLS terminator (stunnel, haproxy), judged by the peer, never by a PROXY
    or launcher-supplied client address. A channel with no IP peer (the socketpair or
    pipes of stunnel's exec) comes from the local launcher itself, which is trusted."""
    if terminators is None:
        return client
    trusted = terminators.contains(client.peer_ip) if ip_peer else True
    return client._replace(tls_in_front=trusted)


# Launcher variables in our own environment describe our launcher's client (or none);
# a program we run must see only the ones of the client it is working for.
LAUNCHER_VARIABLES = (
    "TCPREMOTEIP", "TCPREMOTEPORT", "TCPREMOTEHOST", "TCPREMOTEINFO",
    "TCPLOCALIP", "TCPLOCALPORT", "PROTO",
)  # fmt: skip


def launcher_environment(client: ClientIdentity) -> dict[str, str]:
    """The ucspi-style variables programs we run (checkpassword, sendmail) expect."""
    env = {"TCPREMOTEIP": client.ip, "TCPLOCALIP": client.local_ip, "PROTO": "TCP"}
    if client.port is not None:
        env["TCPREMOTEPORT"] = str(client.port)
    if client.local_port is not None:
        env["TCPLOCALPORT"] = str(client.local_port)
    if client.hostname:
        env["TCPREMOTEHOST"] = client.hostname
    return env
