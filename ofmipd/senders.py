"""Which envelope senders an authenticated user may use (--sender-map FILE).

Like Postfix's smtpd_sender_login_maps with reject_sender_login_mismatch. One line
per user, first the login name, then addresses separated by commas or spaces:

    # user      may send as
    alice       alice@example.org, a.smith@example.org
    bob         @example.net          # any address in this domain
    *           @example.org          # everyone else: only this domain

Names and addresses compare case-insensitively. A user with no line (and no `*`
line) may use no sender. The null sender <> is always allowed (RFC 5321 §4.5.5
bounces). Without a map any sender is allowed.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from ofmipd.errors import ConfigError

_ADDRESS = re.compile(r"^(?:[^@\s,]+@[^@\s,]+|@[^@\s,]+)$")


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
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            user, _, rest = line.partition(" ") if " " in line else line.partition("\t")
            addresses = tuple(a.lower() for a in re.split(r"[,\s]+", rest.strip()) if a)
            if not addresses:
                raise ConfigError(f"{source} line {number}: {user} has no addresses")
            for address in addresses:
                if not _ADDRESS.match(address):
                    raise ConfigError(
                        f"{source} line {number}: {address!r} is not an address or @domain"
                    )
            entries[user.lower()] = entries.get(user.lower(), ()) + addresses
        return cls(entries, source)

    def allows(self, user: str, sender: str) -> bool:
        if sender in ("", "<>"):
            return True
        sender = sender.lower()
        domain = "@" + sender.rpartition("@")[2] if "@" in sender else None
        allowed = self.entries.get(user.lower(), self.entries.get("*", ()))
        return sender in allowed or (domain is not None and domain in allowed)
