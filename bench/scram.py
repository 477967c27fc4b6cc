"""A SCRAM-SHA-256 login's round trip beside PLAIN's, for the same passwd-file user.

One ofmipd daemon with `--passwd-file` holding one `{SCRAM-SHA-256}` line (4096
iterations, as `ofmipd-passwd add` writes it): PLAIN verifies the password against it
(one PBKDF2 of 4096 rounds on the server), SCRAM proves it with scramp's client (the
PBKDF2 moves to the client; the server does a few HMACs, over two more round trips).
Each login is its own connection (connect, 220, EHLO, AUTH ..., QUIT); only AUTH is timed,
from the first AUTH line sent to the 235 read, the client's own work included: that is a
login as a client sees it. The two mechanisms alternate login by login, so a slow spell
on the machine lands on both.
"""

from __future__ import annotations

import asyncio
import base64
import statistics
import time
from pathlib import Path

from bench import load

MECHANISMS = ("PLAIN", "SCRAM-SHA-256")


def write_passwd_file(root: Path) -> Path:
    """The bench user with its password as ofmipd-passwd stores it: {SCRAM-SHA-256}."""
    from ofmipd.passwd import hash_password

    path = root / "passwd-file"
    path.write_text(f"{load.USER}:{hash_password(load.PASSWORD.encode(), 'SCRAM-SHA-256')}\n")
    path.chmod(0o600)
    return path


async def _auth_plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await load.command(reader, writer, b"AUTH PLAIN " + load.plain_token(), 235)


async def _auth_scram(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
    """SCRAM-SHA-256 with the server-final in a last 334 (the default); returns the
    seconds the client spent on its own key derivation, for the report."""
    from scramp import ScramClient

    client = ScramClient(["SCRAM-SHA-256"], load.USER, load.PASSWORD)
    first = base64.b64encode(client.get_client_first().encode())
    lines = await load.command(reader, writer, b"AUTH SCRAM-SHA-256 " + first, 334)
    client.set_server_first(base64.b64decode(lines[-1][4:]).decode())
    started = time.perf_counter()
    final = base64.b64encode(client.get_client_final().encode())  # the client's PBKDF2
    client_work = time.perf_counter() - started
    lines = await load.command(reader, writer, final, 334)
    client.set_server_final(base64.b64decode(lines[-1][4:]).decode())  # the server's proof
    await load.command(reader, writer, b"", 235)
    return client_work


async def one_login(port: int, mechanism: str) -> tuple[float, float]:
    """(AUTH round trip, client's own work) of one login on a new connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await load.expect(reader, 220, "banner")
        await load.command(reader, writer, b"EHLO bench.example.org", 250)
        started = time.perf_counter()
        client_work = 0.0
        if mechanism == "PLAIN":
            await _auth_plain(reader, writer)
        else:
            client_work = await _auth_scram(reader, writer)
        elapsed = time.perf_counter() - started
        await load.command(reader, writer, b"QUIT", 221)
    finally:
        writer.close()
    return elapsed, client_work


async def round_of_logins(port: int, logins: int, first: int) -> dict[str, float]:
    """`logins` of each mechanism, alternating (starting with MECHANISMS[first]): the
    median AUTH round trip of each and the median SCRAM client work, in seconds."""
    times: dict[str, list[float]] = {m: [] for m in MECHANISMS}
    work: list[float] = []
    order = MECHANISMS[first:] + MECHANISMS[:first]
    for _ in range(logins):
        for mechanism in order:
            elapsed, client_work = await one_login(port, mechanism)
            times[mechanism].append(elapsed)
            if mechanism != "PLAIN":
                work.append(client_work)
    medians = {m: statistics.median(v) for m, v in times.items()}
    return medians | {"SCRAM client work": statistics.median(work)}
