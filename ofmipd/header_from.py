"""--check-header-from: the header From and Sender must be addresses the login may use.

Like maddy's authorize_sender: every address in every From and Sender field must be
one the sender map allows for the login. The check fails closed, so that a forged
From cannot be smuggled past it by a parser difference between ofmipd and the
recipient's mail program: a field that does not parse cleanly (any defect), that
has no address, that holds an address without an "@" (an encoded word where an
address should be) or that two parsers read differently is refused.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ofmipd.fixups import header_fields

if TYPE_CHECKING:
    from ofmipd.senders import SenderMap

CHECKED = ("from", "sender")


def forged_address(content: bytes, user: str, senders: SenderMap) -> str | None:
    """The first From/Sender address (or field) `user` may not use, or None if all are his."""
    for name, raw in header_fields(content):
        if name not in CHECKED:
            continue
        addresses = _addresses(raw)
        if addresses is None:
            return f"unreadable {name.capitalize()} field"
        for address in addresses:
            if not senders.allows(user, address):
                return address
    return None


def _addresses(raw: bytes) -> list[str] | None:
    """Each address of a From/Sender value, or None if it cannot be read unambiguously."""
    import email.policy
    import email.utils

    # Undecodable bytes become U+FFFD, which no allowed address contains.
    value = raw.decode("utf-8", errors="replace").replace("\r\n", "").strip()
    if not value:
        return None
    try:
        header = email.policy.default.header_factory("From", value)
    except Exception:  # noqa: BLE001 -- the email package's parser raises assorted errors
        return None
    # A UTF-8 local part is RFC 6532 (we offer SMTPUTF8), not a defect; any other is.
    if any(type(d).__name__ != "NonASCIILocalPartDefect" for d in header.defects):
        return None
    addresses = [a.addr_spec for group in header.groups for a in group.addresses]
    # A second reading, by the older parser (strict: it refuses what it cannot split).
    others = [a for _, a in email.utils.getaddresses([value])]
    if not addresses or sorted(a.lower() for a in addresses) != sorted(a.lower() for a in others):
        return None
    if any(a.count("@") != 1 or not a.rpartition("@")[0] for a in addresses):
        return None
    return addresses
