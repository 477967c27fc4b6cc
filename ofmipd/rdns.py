"""Reverse DNS names for the Received header, looked up off the loop and remembered.

A submission server sees the same few client addresses all day; asking the
resolver (a thread hop, then maybe the network) once per session costs more than
the rest of a short session. Names are kept for a while, like nscd would.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import OrderedDict


class ReverseNames:
    def __init__(self, ttl: float = 600.0, size: int = 10000, timeout: float = 3.0) -> None:
        self.ttl = ttl
        self.size = size
        self.timeout = timeout
        self._known: OrderedDict[str, tuple[float, str | None]] = OrderedDict()
        self._pending: dict[str, asyncio.Future[str | None]] = {}

    async def name(self, ip: str) -> str | None:
        now = time.monotonic()
        known = self._known.get(ip)
        if known is not None and known[0] > now:
            self._known.move_to_end(ip)
            return known[1]
        pending = self._pending.get(ip)
        if pending is None:  # one lookup per address, however many sessions wait on it
            pending = asyncio.ensure_future(self._lookup(ip))
            self._pending[ip] = pending
            pending.add_done_callback(lambda _: self._pending.pop(ip, None))
        try:
            return await asyncio.wait_for(asyncio.shield(pending), self.timeout)
        except (TimeoutError, OSError):
            return None

    async def _lookup(self, ip: str) -> str | None:
        try:
            name, _ = await asyncio.get_running_loop().getnameinfo((ip, 0), socket.NI_NAMEREQD)
        except (OSError, UnicodeError):
            name = None
        self._known[ip] = (time.monotonic() + self.ttl, name)
        while len(self._known) > self.size:
            self._known.popitem(last=False)
        return name
