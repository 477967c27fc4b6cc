"""Loopback ports for the servers the tests start, without collisions under pytest-xdist.

Binding port 0 and closing the socket (the usual trick) hands out a port from the
kernel's ephemeral range, where any outgoing connection may take it before the server
binds, and where another xdist worker may be handed the same one. Instead each process
takes ports from below the ephemeral range (32768-60999 on Linux) and, under xdist, from
a slice of its own, so no two workers of a run ever hand out the same port. Within a
slice it starts at a random place and counts on, skipping ports in use, so concurrent
runs of the suite stay apart too.
"""

from __future__ import annotations

import itertools
import os
import random
import socket

LOW, HIGH = 20000, 32000  # below /proc/sys/net/ipv4/ip_local_port_range


def _slice() -> range:
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # "gw3"
    index = int(worker[2:]) % count if worker[2:].isdigit() else 0
    size = (HIGH - LOW) // count
    return range(LOW + index * size, LOW + (index + 1) * size)


_ports = _slice()
_next = itertools.cycle(_ports)
for _ in range(random.randrange(len(_ports))):  # a random start; this process only
    next(_next)


def free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` that nothing listens on and no other worker will be given."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(len(_ports)):
        port = next(_next)
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue  # in use (or lingering): the next one
            return port
    raise RuntimeError(f"no free port on {host} in {_ports}")
