"""-R imap:// and pop3:// against hostile servers: every bound holds, and is named.

Stand-ins (no real server misbehaves on demand) send endless literals, endless untagged
lines, huge responses, or trickle; each must end in TEMPFAIL with a reason naming the
bound, quickly, and without stalling other clients of a real ofmipd. POP3 status lines
are read strictly: [IN-USE] after PASS or APOP is TEMPFAIL, shown with a stand-in and
with a real Dovecot holding the maildrop lock for another session.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from auth_backends.remote import MAX_BYTES, MAX_LINE, MAX_LINES, MAX_LITERALS
from ofmipd.auth import Outcome, Verdict
from ofmipd.identity import ClientIdentity
from tests.dovecot_server import Dovecot
from tests.ofmipd_server import Daemon
from tests.ports import free_port
from tests.remote_standin import Peer, Script, Standin, verify_url

PASSWORD = "S3cret!pw"


def run(script: Script, scheme: str, client: ClientIdentity, query: str = "") -> Outcome:
    async def go() -> Outcome:
        async with Standin(script) as server:
            return await verify_url(server.url(scheme, query), "alice", PASSWORD, client)

    return asyncio.run(go())


async def imap_greeting_then(peer: Peer, flood: bytes, repeat: int = 10**9) -> None:
    """Greets with capabilities, takes LOGIN, then sends `flood` over and over."""
    await peer.send(b"* OK [CAPABILITY IMAP4rev1] hi\r\n")
    await peer.line()
    for _ in range(repeat):
        await peer.send(flood)


# -- each bound, named -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("flood", "bound"),
    [
        # an untagged response that keeps ending in a literal: small ones, then big ones
        (b"x {1}\r\ny", f"more than {MAX_LITERALS} literals"),
        (b"x {60000}\r\n" + b"y" * 60000, f"more than {MAX_BYTES} bytes"),
        (b"* OK still thinking\r\n", f"more than {MAX_LINES} lines"),
        (b"* " + b"z" * 20000, f"a line longer than {MAX_LINE} bytes"),
        (b"* 1 FETCH (BODY[] {70000}\r\n", "IMAP literal of 70000 bytes"),
    ],
    ids=["literals", "literal-bytes", "untagged-lines", "long-line", "huge-literal"],
)
def test_hostile_imap_flood_is_tempfail_naming_the_bound(
    flood: bytes, bound: str, client: ClientIdentity
) -> None:
    async def script(peer: Peer) -> None:
        if flood.startswith(b"x "):  # continue one untagged line: "* 1 FETCH ... {n}" ...
            await imap_greeting_then(peer, b"* 1 FETCH (BODY[] {1}\r\ny", repeat=1)
            while True:
                await peer.send(flood)
        await imap_greeting_then(peer, flood)

    started = time.monotonic()
    outcome = run(script, "imap", client)
    assert outcome.verdict is Verdict.TEMPFAIL, outcome
    assert bound in outcome.reason, outcome
    assert time.monotonic() - started < 3.0  # bounded work, not the 10 s timeout


def test_hostile_pop3_flood_is_tempfail_naming_the_bound(client: ClientIdentity) -> None:
    async def endless_capa(peer: Peer) -> None:
        await peer.send(b"+OK hi\r\n")
        await peer.line()
        await peer.send(b"+OK\r\n")
        while True:
            await peer.send(b"X" * 1000 + b"\r\n")

    outcome = run(endless_capa, "pop3", client)
    assert outcome.verdict is Verdict.TEMPFAIL
    assert "POP3 CAPA list longer than 200 lines" in outcome.reason

    async def endless_answer(peer: Peer) -> None:
        await peer.send(b"+OK hi\r\n")
        await peer.line()
        await peer.send(b"-ERR no CAPA\r\n")
        await peer.line()  # USER
        while True:
            await peer.send(b"+" * 16000)

    outcome = run(endless_answer, "pop3", client)
    assert outcome.verdict is Verdict.TEMPFAIL
    assert f"a line longer than {MAX_LINE} bytes" in outcome.reason


def trickle(first: bytes, then: bytes) -> Script:
    async def script(peer: Peer) -> None:
        await peer.send(first)
        await peer.line()
        while True:
            await peer.send(then)
            await asyncio.sleep(0.05)

    return script


@pytest.mark.parametrize(
    "script",
    [
        # untagged lines, each well within every bound, but never a verdict
        trickle(b"* OK hi\r\n", b"* OK still here\r\n"),
        # a literal whose bytes come slowly
        trickle(b"* OK hi\r\n", b"* 1 FETCH {60000}\r\n" + b"y" * 1000),
    ],
    ids=["lines", "literal"],
)
def test_trickling_imap_server_is_cut_at_the_timeout(
    script: Script, client: ClientIdentity
) -> None:
    started = time.monotonic()
    outcome = run(script, "imap", client, "timeout=1")
    elapsed = time.monotonic() - started
    assert outcome.verdict is Verdict.TEMPFAIL
    assert "login dialogue unfinished after 1s (timeout)" in outcome.reason
    assert elapsed < 3.0


def test_tls_handshake_counts_against_the_timeout(client: ClientIdentity) -> None:
    async def never_shakes_hands(peer: Peer) -> None:
        await peer.send(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n")
        await peer.line()
        await peer.send(b"s1 OK Begin TLS negotiation now\r\n")
        await peer.reader.read()  # the ClientHello gets no answer until the client leaves

    started = time.monotonic()
    outcome = run(never_shakes_hands, "imap", client, "timeout=1")
    assert outcome.verdict is Verdict.TEMPFAIL
    assert "login dialogue unfinished after 1s (timeout)" in outcome.reason
    assert time.monotonic() - started < 3.0


# -- strict status lines -------------------------------------------------------------------


def pop3_answering(to_login: bytes, greeting: bytes = b"+OK hi <1.2@standin>") -> Script:
    async def script(peer: Peer) -> None:
        await peer.send(greeting + b"\r\n")
        while line := await peer.line():
            if line == b"CAPA":
                await peer.send(b"+OK\r\nUSER\r\n.\r\n")
            elif line.startswith((b"PASS ", b"APOP ")):
                await peer.send(to_login + b"\r\n")
            elif line == b"QUIT":
                return
            else:
                await peer.send(b"+OK\r\n")

    return script


@pytest.mark.parametrize("scheme", ["pop3", "apop"])
def test_pop3_in_use_after_the_password_is_tempfail(scheme: str, client: ClientIdentity) -> None:
    # A server that reports the maildrop lock before checking the password: any password.
    outcome = run(pop3_answering(b"-ERR [IN-USE] maildrop locked"), scheme, client)
    assert outcome.verdict is Verdict.TEMPFAIL
    command = "APOP" if scheme == "apop" else "PASS"
    assert outcome.reason.endswith(f"POP3 -ERR [IN-USE] to {command}")


@pytest.mark.parametrize(
    ("to_login", "greeting", "complaint"),
    [
        (b"+OKAY", b"+OK hi <1.2@x>", "unexpected POP3 response to"),
        (b"+OKwelcome", b"+OK hi <1.2@x>", "unexpected POP3 response to"),
        (b"-ERRor", b"+OK hi <1.2@x>", "unexpected POP3 response to"),
        (b"+OK", b"+OKAY hi <1.2@x>", "not a POP3 greeting"),
    ],
)
def test_pop3_status_lines_are_read_strictly(
    to_login: bytes, greeting: bytes, complaint: str, client: ClientIdentity
) -> None:
    for scheme in ("pop3", "apop"):
        outcome = run(pop3_answering(to_login, greeting), scheme, client)
        assert outcome.verdict is Verdict.TEMPFAIL, (scheme, outcome)
        assert complaint in outcome.reason


@pytest.mark.parametrize(
    ("greeting", "to_login", "complaint"),
    [
        (b"* OK hi", b"a1 OKAY", "unexpected IMAP response to LOGIN"),
        (b"* OK hi", b"a1 OK-ish", "unexpected IMAP response to LOGIN"),
        (b"* OK hi", b"a9 OK", "unexpected IMAP response to LOGIN"),  # not our tag
        (b"* OKAY hi", b"a1 OK", "not an IMAP greeting"),
    ],
)
def test_imap_status_lines_are_read_strictly(
    greeting: bytes, to_login: bytes, complaint: str, client: ClientIdentity
) -> None:
    async def script(peer: Peer) -> None:
        await peer.send(greeting + b"\r\n")
        while line := await peer.line():
            tag, _, command = line.partition(b" ")
            if command == b"CAPABILITY":
                await peer.send(b"* CAPABILITY IMAP4rev1\r\n" + tag + b" OK\r\n")
            else:
                await peer.send(to_login + b"\r\n")

    outcome = run(script, "imap", client)
    assert outcome.verdict is Verdict.TEMPFAIL, outcome
    assert complaint in outcome.reason


@pytest.mark.slow
def test_real_dovecot_in_use_for_another_session_is_tempfail(client: ClientIdentity) -> None:
    # Dovecot checks the password, then waits (10 s, its own constant) for the maildrop
    # lock that the session we hold open keeps: -ERR [IN-USE]. No verdict on this login.
    with Dovecot(
        {"alice": PASSWORD}, tls=False, extra_config="pop3_lock_session = yes\n"
    ) as server:
        with socket.create_connection((server.host, server.ports["pop3"]), timeout=10) as held:
            reader = held.makefile("rb")
            reader.readline()
            for command in (b"USER alice", b"PASS " + PASSWORD.encode()):
                held.sendall(command + b"\r\n")
                assert reader.readline().startswith(b"+OK")

            async def three() -> list[Outcome]:
                return await asyncio.gather(
                    verify_url(server.url("pop3") + "?timeout=20", "alice", PASSWORD, client),
                    verify_url(server.url("apop") + "?timeout=20", "alice", PASSWORD, client),
                    verify_url(server.url("pop3") + "?timeout=20", "alice", "wrong", client),
                )

            pop3, apop, wrong = asyncio.run(three())
            reader.close()  # its reference would keep the session open past `with`
        assert pop3.verdict is Verdict.TEMPFAIL, pop3
        assert pop3.reason.endswith("POP3 -ERR [IN-USE] to PASS")
        assert apop.verdict is Verdict.TEMPFAIL, apop
        assert apop.reason.endswith("POP3 -ERR [IN-USE] to APOP")
        assert wrong.verdict is Verdict.REJECT  # the password is still checked first
        # The lock released, the same login is accepted.
        time.sleep(0.2)
        again = asyncio.run(verify_url(server.url("pop3"), "alice", PASSWORD, client))
        assert again.verdict is Verdict.ACCEPT, again


# -- a hostile server does not stall a real ofmipd's other clients -----------------------

FLOODER = r"""
import socket, sys, threading
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
CHUNK = b" {1}\r\ny" * 4096  # small literals: the most lines and copies per byte

def serve(conn):
    try:
        conn.sendall(b"* OK [CAPABILITY IMAP4rev1] hi\r\n")
        conn.recv(1024)  # LOGIN
        conn.sendall(b"* 1 FETCH (BODY[] {1}\r\ny")
        while True:  # one untagged response that keeps ending in a literal
            conn.sendall(CHUNK)
    except OSError:
        pass
    finally:
        conn.close()

while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


class Smtp:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.reader = self.sock.makefile("rb")
        self.reply()

    def reply(self) -> bytes:
        while (line := self.reader.readline())[3:4] == b"-":
            pass
        return line

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


@pytest.fixture
def flooder() -> Iterator[int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", FLOODER], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


def noop_times(smtp: Smtp, count: int) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        assert smtp.command(b"NOOP").startswith(b"250")
        times.append(time.perf_counter() - started)
        time.sleep(0.01)
    return times


@pytest.mark.slow
def test_flooding_server_does_not_stall_other_clients(flooder: int, tmp_path: Path) -> None:
    port = free_port()
    args = ["-p", f"127.0.0.1:{port}", "-R", f"imap://127.0.0.1:{flooder}",
            "--ratelimit", "off", "--sendmail", "/bin/true"]  # fmt: skip
    with Daemon(args, port, tmp_path) as daemon:
        watcher = Smtp(port)
        watcher.command(b"EHLO watcher.test")
        noop_times(watcher, 20)  # warm up
        idle = statistics.median(noop_times(watcher, 40))

        stop = threading.Event()
        answers: list[bytes] = []

        def attack() -> None:
            token = base64.b64encode(b"\0alice\0" + PASSWORD.encode())
            while not stop.is_set():
                attacker = Smtp(port)
                attacker.command(b"EHLO attacker.test")
                answers.append(attacker.command(b"AUTH PLAIN " + token))
                attacker.close()

        attackers = [threading.Thread(target=attack) for _ in range(2)]
        for thread in attackers:
            thread.start()
        try:
            time.sleep(0.3)
            busy = statistics.median(noop_times(watcher, 60))
        finally:
            stop.set()
            for thread in attackers:
                thread.join(30)
        watcher.close()
        log = daemon.log_text()
    print(f"\nNOOP median idle {idle * 1000:.2f} ms, during the flood {busy * 1000:.2f} ms")
    assert len(answers) >= 2 and all(a.startswith(b"454") for a in answers), answers[:3]
    assert f"server sent more than {MAX_LITERALS} literals (bound per login)" in log
    assert busy <= 2 * idle + 0.001, (idle, busy)
