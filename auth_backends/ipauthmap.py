"""tmda-ofmipd's ipauthmap: which remote IMAP/POP3 server checks a client, by local address.

tmda-ofmipd's ipauthmap, kept: when the URL's host is 0.0.0.0, the server to ask is
chosen by the local address the client connected to, from a file of lines

    LOCALIP REMOTEHOST [PORT]      # IPv4 or IPv6, whitespace-separated
    LOCALIP:REMOTEHOST[:PORT]      # tmda's older form, IPv4 only

with `#` comments. tmda-ofmipd had no flag for the file: it read /etc/ipauthmap when
started as root and ~/.tmda/ipauthmap otherwise; ofmipd does the same unless the URL
(`?ipauthmap=FILE`) or the TOML table (`ipauthmap = "FILE"`) names one. A local address
missing from the map goes to 127.0.0.1 at the URL's port, as in tmda (`fallback`
changes that; `fallback = "none"` answers TEMPFAIL instead).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re

from ofmipd.errors import ConfigError
from ofmipd.identity import normalise_ip

log = logging.getLogger("ofmipd.auth.remote")

MAP_HOST = "0.0.0.0"  # tmda's marker: "ask the server that belongs to the local address"
TMDA_FALLBACK = "127.0.0.1"
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")

Entry = tuple[str, int | None]  # remote host, port (None: the URL's port)


def default_map_path() -> str:
    # tmda-ofmipd's rule, decided once at start-up (before any privilege drop).
    if os.geteuid() == 0:
        return "/etc/ipauthmap"
    return os.path.join(os.path.expanduser("~"), ".tmda", "ipauthmap")


def _ip(text: str) -> str | None:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return None
    return normalise_ip(text)  # canonical, IPv4-mapped IPv6 as IPv4, like ClientIdentity


def parse_host(text: str) -> str | None:
    return _ip(text) or (text if _HOSTNAME.match(text) else None)


def parse_map(text: str, source: str) -> dict[str, Entry]:
    """LOCALIP -> (REMOTEHOST, PORT or None); any malformed line is a ConfigError."""
    entries: dict[str, Entry] = {}
    first_seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            local, entry = _parse_line(line)
        except ValueError as error:
            raise ConfigError(f"ipauthmap {source} line {number}: {error}") from None
        if local in entries:
            # tmda let the last line win silently; two routes for one address is a typo.
            raise ConfigError(
                f"ipauthmap {source} line {number}: {local} is already mapped on line "
                f"{first_seen[local]}"
            )
        entries[local] = entry
        first_seen[local] = number
    return entries


def _parse_line(line: str) -> tuple[str, Entry]:
    pieces = line.split()
    if len(pieces) == 1:
        pieces = line.split(":")  # the older a:b[:port] form (IPv4 only)
    if len(pieces) not in (2, 3):
        raise ValueError("expected LOCALIP REMOTEHOST [PORT] (or LOCALIP:REMOTEHOST[:PORT])")
    local = _ip(pieces[0])
    if local is None:
        raise ValueError(f"{pieces[0]!r} is not an IP address")
    remote = parse_host(pieces[1])
    if remote is None:
        raise ValueError(f"{pieces[1]!r} is not an IP address or host name")
    port = None
    if len(pieces) == 3:
        if not pieces[2].isdigit() or not 0 < int(pieces[2]) < 65536:
            raise ValueError(f"{pieces[2]!r} is not a port number")
        port = int(pieces[2])
    return local, (remote, port)


class IpAuthMap:
    """The map file, re-read when it changes (one stat per lookup)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, ...] | None = None
        self._entries: dict[str, Entry] = {}
        self._error: ConfigError | None = None
        self.entries()  # start-up: a missing or malformed file stops ofmipd

    def entries(self) -> dict[str, Entry]:
        try:
            st = os.stat(self.path)
        except OSError as error:
            raise ConfigError(f"ipauthmap {self.path}: {error.strerror}") from None
        # The inode is part of the stamp: a file replaced within one mtime tick is seen.
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)
        if stamp != self._stamp:
            reload = self._stamp is not None
            self._stamp = stamp
            try:
                with open(self.path, encoding="utf-8", errors="replace") as handle:
                    self._entries, self._error = parse_map(handle.read(), self.path), None
            except OSError as error:
                self._error = ConfigError(f"ipauthmap {self.path}: {error.strerror}")
            except ConfigError as error:
                self._error = error
            if reload and self._error is not None:
                log.error("%s", self._error)  # once per change of the file, not per login
        if self._error is not None:
            raise self._error
        return self._entries

    def lookup(self, local_ip: str) -> Entry | None:
        return self.entries().get(normalise_ip(local_ip) or local_ip)
