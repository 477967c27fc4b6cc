"""The SMTP client's address as a remote IMAP/POP3 login passes it on (IMAP ID, POP3 XCLIENT).

Dovecot's auth penalty and its logs are per client address. Without these fields every
login arrives from ofmipd's own address, so one attacker's failures slow every user's
login. Dovecot honours them only from its login_trusted_networks.
"""

from __future__ import annotations

from typing import NamedTuple

from ofmipd.identity import ClientIdentity, normalise_ip


class ClientAddress(NamedTuple):
    """Canonical address text and ports only: nothing here can break a command line."""

    ip: str
    port: int | None
    local_ip: str | None  # the address of ofmipd's listener that the client connected to
    local_port: int | None


def client_address(client: ClientIdentity | None) -> ClientAddress | None:
    """What may be passed on, or None when the client's address is unknown."""
    if client is None:
        return None
    ip = normalise_ip(client.ip)  # re-parsed: only an address's canonical text survives
    if not ip:
        return None
    local_ip = normalise_ip(client.local_ip) or None
    return ClientAddress(ip, _port(client.port), local_ip, _port(client.local_port))


def _port(port: object) -> int | None:
    if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536:
        return port
    return None
