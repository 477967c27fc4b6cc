"""Host-based access rules: which clients are refused, trusted to relay, or must use TLS.

A rules file (--rules FILE) is written in one of two syntaxes, and each has its own
order. A file that mixes them is refused at start-up, naming the first line in the
other syntax: no single order could explain both.

ofmipd's own syntax: read top to bottom, the first line whose address matches the
client decides. A client no line matches is treated as `allow`.

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
comment.

tcprules syntax (`ADDRESS:allow` or `ADDRESS:deny`, as tcprules(1) compiles it for
tcpserver), so that an existing tcpserver rules file means the same here. The order
of the lines does not matter: like tcpserver, ofmipd uses the line for the client's
exact address, else the one for the longest dotted prefix of it (`10.1.2.`, `10.1.`,
`10.`), else the default line with an empty address (`:deny`). Where the same
address appears on two lines, the first one counts, as in tcprules' cdb. Understood:

    127.0.0.1:allow,RELAYCLIENT=""    an exact IPv4 address (or an IPv6 one, an ofmipd
                                      extension: tcpserver itself is IPv4 only)
    192.168.:allow                    a prefix of one to three numbers ending in "."
    192.0.2.64-79:deny                a range in one number: 192.0.2.64 up to .79
    10.2-3.:deny                      (so this is 10.2. and 10.3.)
    :allow                            the default
    ...:deny,VAR="x"                  deny (tcpserver sets nothing for a denied client)
    ...:allow,RELAYCLIENT="@fix.me"   relay, whatever the value (as qmail-smtpd reads
                                      it; any quote character, as tcprules allows)

Refused with the line number, because ofmipd cannot honour them or tcpserver would
never match them: host names (`=host`), TCPREMOTEINFO (`user@`), variables other than
RELAYCLIENT on an allow line, indented lines, trailing comments, addresses with
leading zeros or numbers over 255, prefixes that do not end in ".", empty ranges.
Comments are lines whose first character is #, as for tcprules.

In TOML the rules are an array of tables in ofmipd's syntax, first match wins:

    [[rule]]
    match = "10.0.0.0/8"          # or a list of them
    action = "require-tls"

A lookup costs one dict probe per distinct prefix length present in the rules,
whatever the number of rules (at most four for a tcprules file of IPv4 lines).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable, Iterator, Mapping
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

FIRST_MATCH = "first match"
MOST_SPECIFIC = "most specific address first, as tcpserver"

_LINE = re.compile(
    r'(?P<who>\S+)\s+(?P<action>\S+)(?:\s+"(?P<message>[^"]*)")?\s*(?:#.*)?',
)
# tcprules(1) splits a line at the first colon followed by "allow" or "deny".
_TCPRULES = re.compile(r"(?P<key>.*?):(?P<action>allow|deny)(?P<env>.*)", re.DOTALL)
_TCPRULES_LINE = re.compile(r"\S*?:(?:allow|deny)")  # how a line is told apart
_BOUND = re.compile(r"[0-9]{1,3}")  # of a range: tcprules reads "07" as 7
_OCTET = re.compile(r"0|[1-9][0-9]{0,2}")  # as tcpserver writes it: no leading zeros
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
    """Host rules with a lookup by client address.

    In file order (`most_specific=False`) the first matching entry wins; otherwise the
    longest matching network wins and the wildcard is the fallback (tcpserver's order).
    Either way, of two entries for the same network the first one counts.
    """

    def __init__(
        self, rules: Iterable[tuple[Rule, Network | None]], most_specific: bool = False
    ) -> None:
        self.order = MOST_SPECIFIC if most_specific else FIRST_MATCH
        self.rules: list[Rule] = []  # distinct rules, in order (a range is one rule)
        self._entries: list[Rule] = []  # one per network; an index is a file position
        # Per IP version: prefix length -> {network as int: index of its first entry}.
        tables: dict[int, dict[int, dict[int, int]]] = {4: {}, 6: {}}
        self._wildcard: int | None = None
        for index, (rule, network) in enumerate(rules):
            self._entries.append(rule)
            if not self.rules or self.rules[-1] is not rule:
                self.rules.append(rule)
            if network is None:
                if self._wildcard is None:
                    self._wildcard = index
                continue
            table = tables[network.version].setdefault(network.prefixlen, {})
            table.setdefault(int(network.network_address), index)  # an earlier twin wins
        # Probe order. First match: prefix lengths whose earliest entry comes first, so a
        # lookup can stop once no remaining length could beat the best index found. Most
        # specific: longest prefix first, so the first hit decides.
        self._probes: dict[int, list[tuple[int, int, dict[int, int]]]] = {}
        for version, by_length in tables.items():
            bits = 32 if version == 4 else 128
            probes = [(min(t.values()), length, t) for length, t in by_length.items()]
            probes.sort(key=lambda p: -p[1] if most_specific else p[0])
            self._probes[version] = [(first, _mask(bits, n), t) for first, n, t in probes]
        self._most_specific = most_specific

    def __len__(self) -> int:
        return len(self.rules)

    def match(self, ip: str) -> Rule:
        """The rule for the client address (the default rule if none matches)."""
        nothing = len(self._entries)
        best = nothing if self._wildcard is None else self._wildcard
        address = _address_value(ip)
        if address is not None:
            version, value = address
            if self._most_specific:
                for _, mask, table in self._probes[version]:
                    index = table.get(value & mask)
                    if index is not None:
                        return self._entries[index]
            else:
                for earliest, mask, table in self._probes[version]:
                    if earliest >= best:
                        break
                    index = table.get(value & mask)
                    if index is not None and index < best:
                        best = index
        return self._entries[best] if best < nothing else DEFAULT_RULE

    # ---- construction ----------------------------------------------------------------

    @classmethod
    def from_text(cls, text: str, source: str) -> Rules:
        entries: list[tuple[Rule, Network | None]] = []
        first: tuple[bool, int] | None = None  # (is tcprules, line number) of line one
        # Lines end at LF only, as for tcprules, so line numbers are an editor's.
        for number, raw in enumerate(text.split("\n"), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            tcprules = _TCPRULES_LINE.match(line) is not None
            if first is None:
                first = (tcprules, number)
            elif tcprules != first[0]:
                syntax = ("tcprules", "ofmipd's") if tcprules else ("ofmipd's", "tcprules")
                raise ConfigError(
                    f"{source} line {number}: {syntax[0]} syntax, but line {first[1]} is "
                    f"in {syntax[1]}; use one syntax per file (tcprules lines are "
                    "looked up most specific first, ofmipd's in file order)"
                )
            where = f"{source}:{number}"
            try:
                if tcprules:
                    entries.extend(_tcprules_entries(raw, where))
                else:
                    entries.append(_parse_line(line, where))
            except ValueError as error:
                raise ConfigError(f"{source} line {number}: {error}") from None
        return cls(entries, most_specific=first is not None and first[0])

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


# ---- tcprules lines ------------------------------------------------------------------


def _tcprules_entries(raw: str, where: str) -> Iterator[tuple[Rule, Network | None]]:
    """One tcprules line as tcprules(1) compiles it: a key (or a range of keys) and
    instructions; only the keys and instructions ofmipd can honour are accepted."""
    if raw[:1].isspace():
        raise ValueError(
            "a tcprules line must start in the first column (tcprules would "
            "keep the leading space in the address, so it would never match)"
        )
    line = raw.rstrip(" \t\r")  # tcprules strips trailing blanks (CR: a CRLF file)
    parts = _TCPRULES.fullmatch(line)
    if parts is None:  # cannot happen after _TCPRULES_LINE matched; kept for safety
        raise ValueError("expected ADDRESS:allow or ADDRESS:deny")
    key, action = parts["key"], parts["action"]
    variables = _tcprules_variables(parts["env"])
    if action == ALLOW and variables:
        others = [name for name in variables if name != "RELAYCLIENT"]
        if others:
            raise ValueError(
                f"ofmipd cannot set {others[0]!r}: of tcprules variables only "
                'RELAYCLIENT is understood (e.g. 10.:allow,RELAYCLIENT="")'
            )
        action = RELAY
    # deny ignores its variables, as tcpserver does: it sets nothing for a dropped client
    if len(key) > 64:  # longer than any address or range, and kept out of the message
        raise ValueError(f"{key[:20]!r}... is too long for an address")
    if "=" in key:
        raise ValueError("host names (=host) need a DNS lookup, which ofmipd's rules do not do")
    if "@" in key:
        raise ValueError("TCPREMOTEINFO rules (user@address) need ident, which ofmipd does not do")
    rule = Rule(action, key or WILDCARD, where)
    for one in _tcprules_range(key):
        yield rule, _tcprules_network(one)


def _tcprules_variables(text: str) -> list[str]:
    """The names in `,NAME=qVALUEq,...` (q: any character, as tcprules allows)."""
    names = []
    while text:
        equals = text.find("=")
        if not text.startswith(",") or equals < 0 or equals + 1 == len(text):
            raise ValueError(
                f'after allow or deny tcprules takes only ,NAME="VALUE", not {text[:40]!r}'
            )
        quote = text[equals + 1]
        end = text.find(quote, equals + 2)
        if end < 0:
            raise ValueError(f"the value of {text[1:equals]!r} has no closing {quote!r}")
        names.append(text[1:equals])
        text = text[end + 1 :]
    return names


def _tcprules_range(key: str) -> list[str]:
    """The keys tcprules makes of `1.2.3.4-7` or `10.2-3.` (the first "-" only)."""
    dash = key.find("-")
    if dash < 0:
        return [key]
    left = key.rfind(".", 0, dash) + 1
    right = key.find(".", dash)
    right = len(key) if right < 0 else right
    low, high = key[left:dash], key[dash + 1 : right]
    if not (_BOUND.fullmatch(low) and _BOUND.fullmatch(high)):
        raise ValueError(f"bad range {key!r}: expected two numbers, as in 192.0.2.64-79")
    bottom, top = int(low), min(int(high), 255)  # tcprules stops at 255
    if bottom > top:
        raise ValueError(f"range {key!r} is empty")
    return [f"{key[:left]}{number}{key[right:]}" for number in range(bottom, top + 1)]


def _tcprules_network(key: str) -> Network | None:
    """The network tcpserver would match a key against: an exact address, a dotted prefix
    or (empty) every client. A key tcpserver could never match is refused."""
    if not key:
        return None
    if ":" in key:  # not tcpserver's (it is IPv4 only): an exact IPv6 address
        try:
            address = ipaddress.IPv6Address(key if "%" not in key else "")
        except ValueError:
            raise ValueError(f"{key!r} is not an IPv6 address") from None
        if address.ipv4_mapped is not None:
            raise ValueError(f"write {key!r} as {address.ipv4_mapped}")
        return ipaddress.IPv6Network(address)
    numbers = key.split(".")
    prefix = numbers[-1] == ""  # "10.1." is a prefix; tcpserver tries no others
    if prefix:
        numbers.pop()
    if len(numbers) not in ((1, 2, 3) if prefix else (4,)):
        raise ValueError(
            f"{key!r} is neither a whole IPv4 address nor a prefix of one to three numbers "
            "ending in '.', so tcpserver would never match it"
        )
    for number in numbers:
        if not _OCTET.fullmatch(number) or int(number) > 255:
            raise ValueError(
                f"{key!r}: {number!r} is not a number from 0 to 255 written without leading "
                "zeros, so tcpserver would never match it"
            )
    padded = numbers + ["0"] * (4 - len(numbers))
    return ipaddress.IPv4Network((".".join(padded), 8 * len(numbers)))


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
