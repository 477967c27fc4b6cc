"""Which envelope senders an authenticated user may use (--sender-map FILE).

Like Postfix's smtpd_sender_login_maps with reject_sender_login_mismatch. One line
per user, first the login name, then addresses separated by commas or spaces:

    # user      may send as
    alice       alice@example.org, a.smith@example.org
    bob         @example.net          # any address in this domain
    *           @example.org          # everyone else: only this domain

The user name ends at the first run of spaces or tabs. Names and addresses
compare case-insensitively; two lines for one user add up. A user with no line
(and no `*` line) may use no sender. The null sender <> is always allowed (RFC
5321 §4.5.5 bounces). Without a map any sender is allowed.

A line that cannot mean what it seems stops start-up with its line number
rather than silently giving a user the `*` permissions: a user name with a
comma or a trailing colon, a word that is not an address or @domain (a user
name with a space in it shows up this way), or a control or invisible
character (other than space and tab) anywhere.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from ofmipd.errors import ConfigError

_ADDRESS = re.compile(r'(?:[^@\s,<>"]+@[^@\s,<>"]+|@[^@\s,<>"]+)')
_BLANKS = re.compile(r"[ \t]+")  # ends the user name
_SEPARATORS = re.compile(r"[ \t,]+")  # between addresses


class SenderMap(NamedTuple):
    entries: dict[str, tuple[str, ...]]
    source: str

    @classmethod
    def from_file(cls, path: str) -> SenderMap:
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"sender map {path}: {getattr(error, 'strerror', error)}") from None
        return cls.from_text(text, path)

    @classmethod
    def from_text(cls, text: str, source: str) -> SenderMap:
        entries: dict[str, tuple[str, ...]] = {}
        # Lines end at LF only: str.splitlines() would also split at U+2028, FF, NEL...
        for number, raw in enumerate(text.split("\n"), 1):
            line = raw.split("#", 1)[0].strip(" \t\r")
            if not line:
                continue
            try:
                user, addresses = _parse_line(line)
            except ValueError as error:
                raise ConfigError(f"{source} line {number}: {error}") from None
            entries[user] = entries.get(user, ()) + addresses
        return cls(entries, source)

    def allows(self, user: str, sender: str) -> bool:
        if sender in ("", "<>"):
            return True
        sender = sender.lower()
        domain = "@" + sender.rpartition("@")[2] if "@" in sender else None
        allowed = self.entries.get(user.lower(), self.entries.get("*", ()))
        return sender in allowed or (domain is not None and domain in allowed)


def _parse_line(line: str) -> tuple[str, tuple[str, ...]]:
    """(user, addresses) of one line without its comment, both lowercased."""
    odd = next((c for c in line if not c.isprintable() and c not in " \t"), None)
    if odd is not None:
        raise ValueError(f"control or invisible character U+{ord(odd):04X}")
    user, *rest = _BLANKS.split(line, maxsplit=1)
    if "," in user:
        raise ValueError(f"user name {user!r} contains a comma (one user per line)")
    if user.endswith(":"):
        raise ValueError(f"user name {user!r} ends with ':' (write the name, then blanks)")
    addresses = tuple(a.lower() for a in _SEPARATORS.split("".join(rest)) if a)
    if not addresses:
        raise ValueError(f"{user!r} has no addresses")
    for position, address in enumerate(addresses):
        if not _ADDRESS.fullmatch(address):
            first_word = position == 0 and "@" not in address
            hint = " (a user name cannot contain blanks)" if first_word else ""
            raise ValueError(f"{address!r} is not an address or @domain{hint}")
    return user.lower(), addresses
