"""The salts SCRAM shows a client before it proves anything, made so that they do not
tell who exists.

A SCRAM server sends a salt in its first answer. For a user ofmipd derives keys for (the
authfile, a passwd-file's {PLAIN} lines) and for a user no store knows, that salt is
HMAC(pepper, the name as sent): the same function, so a prober cannot tell the two
apart, by comparing two probes, two spellings, SHA-1 with SHA-256, or a salt it computed
itself. The pepper is one random secret per installation, kept in the embedded store
(the state directory's SQLite file, or Redis), so every process (one per connection
under tcpserver or inetd) and every host sharing the store shows the same salts; a salt
that changed from one connection to the next would itself say "unknown". Without a
store, the pepper is per process.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ofmipd.store import Store

KEY = "scram:pepper"
TTL = 20 * 365 * 86400.0  # for good: a new pepper would change every derived salt at once
_pepper: bytes | None = None


async def load_pepper(store: Store | None) -> bytes:
    """The installation's pepper, read from the store once per process."""
    global _pepper
    if _pepper is None:
        _pepper = await _from_store(store) if store is not None else os.urandom(32)
    return _pepper


async def _from_store(store: Store) -> bytes:
    from ofmipd.store import StoreDown

    try:
        text = await store.get(KEY)
        if text is None:
            await store.put(KEY, base64.b64encode(os.urandom(32)).decode(), TTL)
            text = await store.get(KEY)  # two first writers: the last one wins for all
        if text:
            return base64.b64decode(text, validate=True)
    except (StoreDown, binascii.Error):
        pass
    return os.urandom(32)  # the store is down or garbled: this process's own


def salt_for(user: str) -> bytes:
    """The salt of keys ofmipd derives for `user`, or fakes when nobody knows the name."""
    global _pepper
    if _pepper is None:  # the Chain loads it first; a direct caller (a test) gets its own
        _pepper = os.urandom(32)
    return hmac.new(_pepper, f"salt\0{user}".encode(), hashlib.sha256).digest()[:16]
