"""Host-based access rules: which clients are refused, trusted to relay, or must use TLS.

The rules file (--rules FILE) is read top to bottom; the first line whose address
matches the client decides. A client no line matches is treated as `allow`.

    # who               action        [message, deny only]
    127.0.0.1           relay
    10.0.0.0/8          require-tls
    2001:db8::/32       allow
    192.0.2.66          deny          "Your host is blocked"
    *                   allow

who:    an IPv4 or IPv6 address, a CIDR network, or * (every client, also an
        unknown one such as a pipe without launcher variables). IPv4-mapped IPv6
        clients (::ffff:192.0.2.1) match IPv4 rules.
action: deny         554 at the banner, then close (the quoted message replaces
                     "Access denied")
        allow        may connect; sending needs AUTH
        relay        may send without AUTH (Postfix mynetworks, tcpserver RELAYCLIENT)
        require-tls  AUTH is offered only once the channel is encrypted

Blank lines and lines starting with # are ignored; a # after the fields starts a
comment. So that an existing tcpserver rules file can be reused, tcprules lines
are also understood, in a small subset: `ADDR:allow`, `ADDR:deny` and
`ADDR:allow,RELAYCLIENT=""`, where ADDR is an address, a dotted IPv4 prefix
ending in "." (`10.`, `192.168.`) or empty (every client). Other tcprules
features (ranges, host names, other variables) are refused with the line number.

In TOML the same rules are an array of tables, in order:

    [[rule]]
    match = "10.0.0.0/8"          # or a list of them
    action = "require-tls"

A lookup costs one dict probe per distinct prefix length present in the rules,
whatever the number of rules.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from ofmipd.errors import ConfigError
from ofmipd.identity import normalise_ip

DENY = "deny"
ALLOW = "allow"
RELAY = "relay"
REQUIRE_TLS = "require-tls"
ACTIONS = (ALLOW, DENY, RELAY, REQUIRE_TLS)
WILDCARD = "*"

_LINE = re.compile(
    r'(?P<who>\S+)\s+(?P<action>\S+)(?:\s+"(?P<message>[^"]*)")?\s*(?:#.*)?',
)
_TCPRULES = re.compile(r"(?P<who>[0-9A-Fa-f.:]*):(?P<action>allow|deny)(?P<env>,.*)?")
_MESSAGE = re.compile(r"[\x20-\x7e]{1,200}")  # it becomes part of an SMTP reply line

_MAPPED_PREFIX = bytes(10) + b"\xff\xff"  # ::ffff:0:0/96

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Rule(NamedTuple):
    action: str
    matcher: str  # as the admin wrote it
    where: str  # "FILE:3", "ofmipd.toml [[rule]] #2", or "default"
    message: str | None = None  # deny only: the text after "554 5.7.1"

    def describe(self) -> str:
        if self.where == "default":
            return f"default rule ({self.action})"
        return f"rule at {self.where} ({self.matcher} {self.action})"


DEFAULT_RULE = Rule(ALLOW, WILDCARD, "default")


class Rules:
    """An ordered rule list with first-match lookup by client address."""

    def __init__(self, rules: Iterable[tuple[Rule, Network | None]]) -> None:
        self.rules: list[Rule] = []
        # Per IP version: prefix length -> {network as int: index of its first rule}.
        # A lookup probes each prefix length once and keeps the smallest index.
        self._tables: dict[int, dict[int, dict[int, int]]] = {4: {}, 6: {}}
        self._wildcard: int | None = None
        for index, (rule, network) in enumerate(rules):
            self.rules.append(rule)
            if network is None:
                if self._wildcard is None:
                    self._wildcard = index
                continue
            table = self._tables[network.version].setdefault(network.prefixlen, {})
            table.setdefault(int(network.network_address), index)  # an earlier twin wins
        # Probe order: prefix lengths whose earliest rule comes first, so a lookup can
        # stop as soon as no remaining length could beat the best index found.
        self._probes: dict[int, list[tuple[int, int, dict[int, int]]]] = {}
        for version, tables in self._tables.items():
            bits = 32 if version == 4 else 128
            probes = [(min(t.values()), _mask(bits, length), t) for length, t in tables.items()]
            self._probes[version] = sorted(probes, key=lambda probe: probe[0])

    def __len__(self) -> int:
        return len(self.rules)

    def match(self, ip: str) -> Rule:
        """The first rule matching the client address (the default rule if none does)."""
        best = len(self.rules) if self._wildcard is None else self._wildcard
        address = _address_value(ip)
        if address is not None:
            version, value = address
            for earliest, mask, table in self._probes[version]:
                if earliest >= best:
                    break
                index = table.get(value & mask)
                if index is not None and index < best:
                    best = index
        return self.rules[best] if best < len(self.rules) else DEFAULT_RULE

    # ---- construction ----------------------------------------------------------------

    @classmethod
    def from_text(cls, text: str, source: str) -> Rules:
        entries = []
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                entries.append(_parse_line(line, f"{source}:{number}"))
            except ValueError as error:
                raise ConfigError(f"{source} line {number}: {error}") from None
        return cls(entries)

    @classmethod
    def from_file(cls, path: str | Path) -> Rules:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as error:
            raise ConfigError(f"rules file {path}: {error.strerror or error}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"rules file {path}: not UTF-8 text") from None
        return cls.from_text(text, str(path))

    @classmethod
    def from_config(cls, tables: Iterable[Mapping[str, Any]], source: str = "config") -> Rules:
        """From TOML [[rule]] tables: match (string or list of strings), action, message."""
        entries = []
        for number, table in enumerate(tables, start=1):
            where = f"{source} [[rule]] #{number}"
            try:
                if not isinstance(table, Mapping):
                    raise ValueError("expected a table")
                unknown = set(table) - {"match", "action", "message"}
                if unknown:
                    raise ValueError(f"unknown key {sorted(unknown)[0]!r}")
                matches = table.get("match")
                if isinstance(matches, str):
                    matches = [matches]
                if not isinstance(matches, list) or not matches:
                    raise ValueError('"match" must be an address, CIDR or "*", or a list of them')
                action, message = table.get("action"), table.get("message")
                if not isinstance(action, str):
                    raise ValueError(f'"action" must be one of {", ".join(ACTIONS)}')
                if message is not None and not isinstance(message, str):
                    raise ValueError('"message" must be a string')
                for who in matches:
                    if not isinstance(who, str):
                        raise ValueError('"match" entries must be strings')
                    entries.append(_entry(who, action, message, where))
            except ValueError as error:
                raise ConfigError(f"{where}: {error}") from None
        return cls(entries)


def _address_value(ip: str) -> tuple[int, int] | None:
    """(IP version, address as int); an IPv4-mapped IPv6 address counts as IPv4."""
    # inet_pton is a fast path for the usual, already normalised text (ipaddress's
    # parser costs several microseconds); normalise_ip handles everything else.
    for family, version in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
        try:
            packed = socket.inet_pton(family, ip)
        except (OSError, ValueError):
            continue
        if version == 6 and packed[:12] == _MAPPED_PREFIX:
            return 4, int.from_bytes(packed[12:], "big")
        return version, int.from_bytes(packed, "big")
    text = normalise_ip(ip)
    if not text:
        return None
    address = ipaddress.ip_address(text)
    return address.version, int(address)


def _mask(bits: int, prefixlen: int) -> int:
    return ((1 << bits) - 1) ^ ((1 << (bits - prefixlen)) - 1)


def _parse_line(line: str, where: str) -> tuple[Rule, Network | None]:
    native = _LINE.fullmatch(line)
    if native:
        return _entry(native["who"], native["action"], native["message"], where)
    tcprules = _TCPRULES.fullmatch(line)
    if tcprules:
        return _tcprules_entry(tcprules["who"], tcprules["action"], tcprules["env"], where)
    raise ValueError('expected WHO ACTION ["message"], e.g. 10.0.0.0/8 require-tls')


def _entry(who: str, action: str, message: str | None, where: str) -> tuple[Rule, Network | None]:
    action = action.lower()
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r} (expected {', '.join(ACTIONS)})")
    if message is not None:
        if action != DENY:
            raise ValueError(f"a message is only allowed with deny, not {action}")
        if not _MESSAGE.fullmatch(message):
            raise ValueError("the message must be 1-200 printable ASCII characters")
    network = None if who == WILDCARD else _network(who)
    return Rule(action, who, where, message), network


def _tcprules_entry(
    who: str, action: str, env: str | None, where: str
) -> tuple[Rule, Network | None]:
    if env:
        if action != ALLOW or env != ',RELAYCLIENT=""':
            raise ValueError('of tcprules instructions only :allow,RELAYCLIENT="" is understood')
        action = RELAY
    if not who:
        network = None
    elif who.endswith("."):  # tcprules prefix: "10." is 10.0.0.0/8
        octets = who[:-1].split(".")
        if len(octets) > 3:
            raise ValueError(f"bad tcprules address prefix {who!r}")
        padded = ".".join(octets + ["0"] * (4 - len(octets)))
        network = _network(f"{padded}/{8 * len(octets)}")
    else:
        network = _network(who)
    return Rule(action, who or WILDCARD, where), network


def _network(text: str) -> Network:
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as error:
        if "host bits set" in str(error):
            wider = ipaddress.ip_network(text, strict=False)
            raise ValueError(f"{text} has host bits set (did you mean {wider}?)") from None
        raise ValueError(f"not an address, CIDR network or *: {text!r}") from None
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        # client addresses arrive normalised, so ::ffff:a.b.c.d/N must be kept as IPv4
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network
