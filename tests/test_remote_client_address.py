"""The SMTP client's address reaches the remote IMAP/POP3 server (IMAP ID, POP3 XCLIENT).

Real Dovecot with its auth penalty on: from login_trusted_networks it logs and penalises
the client's address, so one attacker's failures no longer slow every user's login.
Scripted stand-in servers for answers Dovecot never gives (NO/BAD to ID, -ERR to XCLIENT).
"""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from auth_backends import BackendSpec, create
from auth_backends.client_address import client_address
from auth_backends.imap import quoted
from auth_backends.kinds import IMAP, POP3
from auth_backends.remote import DEFAULT_TIMEOUT
from ofmipd.auth import Authenticator, Outcome, Secret, Verdict
from ofmipd.config import Config
from ofmipd.identity import ClientIdentity
from tests.conftest import free_port
from tests.dovecot_server import Dovecot
from tests.ofmipd_server import Daemon, ofmipd_command, server_env

USERS = {"alice": "wonderland", "bob": "builder", "carol": "cheshire"}
CLIENT = "192.0.2.10"
ATTACKER = "192.0.2.66"  # only the penalty tests log in from the attackers' addresses
HONEST = "198.51.100.7"
LISTENER = "192.0.2.25"  # the address of ofmipd's own listener, as its client saw it

# tests/dovecot_server.py turns Dovecot's auth penalty off (mode 0: no socket, no penalty);
# these tests are about that penalty, so the socket comes back with Dovecot's default mode.
PENALTY_ON = "service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0600\n  }\n}\n"
TRUSTED = (
    "login_trusted_networks = 127.0.0.0/8\n"
    "login_log_format_elements = user=<%u> method=%m rip=%r rport=%{rport} lip=%l "
    "lport=%{lport} mpid=%e %c session=<%{session}>\n"
)


def smtp_client(ip: str, port: int = 40123) -> ClientIdentity:
    return ClientIdentity(
        ip=ip, port=port, local_ip=LISTENER, local_port=587, source="socket", peer_ip=ip
    )


def backend(url: str) -> Authenticator:
    kind = "imap" if url.startswith("imap") else "pop3"
    return create(BackendSpec(kind=kind, arg=url))


def verify(url: str, user: str, password: str, client: ClientIdentity) -> Outcome:
    return asyncio.run(backend(url).verify(user, Secret(password.encode()), client))


def log_line(server: Dovecot, pattern: str, timeout: float = 5.0) -> str:
    """Dovecot's log process writes a moment after the login: wait for the line."""
    deadline = time.monotonic() + timeout
    while True:
        text = (server.root / "dovecot.log").read_text(errors="replace")
        found = re.search(pattern, text)
        if found:
            return found.group(0)
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line matching {pattern!r} in:\n{text[-3000:]}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def trusting() -> Iterator[Dovecot]:
    with Dovecot(USERS, tls=False, extra_config=TRUSTED + PENALTY_ON) as server:
        yield server


# -- the address reaches a Dovecot that trusts us ---------------------------------------


@pytest.mark.parametrize("ip", [CLIENT, "2001:db8::11"])
def test_imap_id_gives_dovecot_the_smtp_clients_address(trusting: Dovecot, ip: str) -> None:
    outcome = verify(trusting.url("imap"), "alice", "wonderland", smtp_client(ip, 4711))
    assert outcome.verdict is Verdict.ACCEPT, outcome
    # x-connected-ip/port: the listener that ofmipd's client connected to
    log_line(
        trusting,
        rf"imap-login: Info: Login: user=<alice>, method=PLAIN, rip={ip}, rport=4711, "
        rf"lip={LISTENER}, lport=587,",
    )


@pytest.mark.parametrize("scheme", ["pop3", "apop"])
def test_pop3_xclient_gives_dovecot_the_smtp_clients_address(
    trusting: Dovecot, scheme: str
) -> None:
    method = "APOP" if scheme == "apop" else "PLAIN"
    client = smtp_client("2001:db8::10" if scheme == "apop" else CLIENT, 4712)
    outcome = verify(trusting.url(scheme), "bob", "builder", client)
    assert outcome.verdict is Verdict.ACCEPT, outcome
    # Dovecot 2.3's XCLIENT takes no local address (2.4 adds DESTADDR): lip stays ours.
    log_line(
        trusting,
        rf"pop3-login: Info: Login: user=<bob>, method={method}, rip={client.ip}, rport=4712,",
    )


def test_odd_client_address_is_not_passed_on(trusting: Dovecot) -> None:
    # ClientIdentity holds checked addresses; were one ever odd, it is left out, not quoted.
    odd = smtp_client('192.0.2.1" "x-originating-ip" "203.0.113.9')
    for scheme in ("imap", "pop3"):
        assert verify(trusting.url(scheme), "carol", "cheshire", odd).verdict is Verdict.ACCEPT
        log_line(trusting, rf"{scheme}-login: Info: Login: user=<carol>, .*rip=127\.0\.0\.1,")
    assert "203.0.113.9" not in (trusting.root / "dovecot.log").read_text()


def test_untrusted_dovecot_ignores_id_and_sees_ofmipd() -> None:
    # Dovecot answers ID with OK but ignores it from outside login_trusted_networks, and
    # offers no XCLIENT: logins still work, under ofmipd's own address.
    with Dovecot(USERS, tls=False) as server:
        for scheme in ("imap", "pop3"):
            outcome = verify(server.url(scheme), "alice", "wonderland", smtp_client(CLIENT))
            assert outcome.verdict is Verdict.ACCEPT, outcome
            log_line(server, rf"{scheme}-login: Info: Login: user=<alice>, .*rip=127\.0\.0\.1,")


def smtp_login_behind_proxy(port: int, proxy: str, user: str, password: str) -> bytes:
    """AUTH PLAIN in an SMTP session that a trusted balancer announces with PROXY v1."""
    with socket.create_connection(("127.0.0.1", port), 30) as sock, sock.makefile("rb") as r:
        sock.sendall(f"PROXY TCP4 {proxy} {LISTENER} 40124 587\r\nEHLO client.test\r\n".encode())
        blob = base64.b64encode(f"\0{user}\0{password}".encode())
        sock.sendall(b"AUTH PLAIN " + blob + b"\r\nQUIT\r\n")
        replies = [line for line in r if line[3:4] == b" "]  # last lines: banner, EHLO...
        return replies[2]


def test_smtp_clients_address_travels_through_ofmipd(trusting: Dovecot, tmp_path: Path) -> None:
    port = free_port()
    args = ["-p", f"127.0.0.1:{port}", "--hostname", "mx.test", "-R", trusting.url("imap"),
            "--proxy-protocol", "127.0.0.1"]  # fmt: skip
    with Daemon(args, port, tmp_path):
        reply = smtp_login_behind_proxy(port, "192.0.2.11", "carol", "cheshire")
    assert reply.startswith(b"235 "), reply
    log_line(
        trusting,
        rf"imap-login: Info: Login: user=<carol>, method=PLAIN, rip=192\.0\.2\.11, "
        rf"rport=40124, lip={LISTENER}, lport=587,",
    )


# -- Dovecot's penalty lands on the attacker ---------------------------------------------


async def attack_while_honest_logs_in(url: str, attacker: str) -> dict[str, float]:
    """Two failed logins from the attacker (Dovecot's penalty: none, then 4 s, then 8 s),
    then the attacker's third try and, while it waits, an honest user's correct login."""
    remote = backend(url)

    async def timed(user: str, password: str, ip: str, expected: Verdict) -> float:
        started = time.monotonic()
        outcome = await remote.verify(user, Secret(password.encode()), smtp_client(ip))
        assert outcome.verdict is expected, (user, ip, outcome)
        return time.monotonic() - started

    times = {"first failure": await timed("alice", "guess-1", attacker, Verdict.REJECT)}
    # A new password each time: Dovecot does not count a repeated user+password twice.
    times["second failure"] = await timed("alice", "guess-2", attacker, Verdict.REJECT)
    third = asyncio.create_task(timed("alice", "guess-3", attacker, Verdict.REJECT))
    await asyncio.sleep(0.2)  # the attacker's try is waiting out its penalty now
    times["honest login"] = await timed("bob", "builder", HONEST, Verdict.ACCEPT)
    assert not third.done(), "the attacker's third try was not delayed"
    times["third failure"] = await third
    return times


@pytest.mark.slow
@pytest.mark.parametrize(("scheme", "attacker"), [("imap", ATTACKER), ("pop3", "192.0.2.67")])
def test_penalty_lands_on_the_attacker_not_on_other_users(
    trusting: Dovecot, scheme: str, attacker: str
) -> None:
    times = asyncio.run(attack_while_honest_logs_in(trusting.url(scheme), attacker))
    print(f"\n{scheme}: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))
    assert times["second failure"] > 3.0, times  # Dovecot's 4 s
    assert times["honest login"] < 2.0, times
    assert times["third failure"] > 6.0, times  # Dovecot's 8 s
    log_line(trusting, rf"auth failed, 1 attempts in \d+ secs\): user=<alice>, .*rip={attacker},")
    log_line(trusting, rf"Login: user=<bob>, method=PLAIN, rip={HONEST},")


@pytest.mark.slow
def test_without_trust_the_penalty_lands_on_everyone() -> None:
    # The bug of issue 17: Dovecot ignores ID from outside login_trusted_networks, so the
    # attacker's failure is counted against ofmipd's address, and so is the honest login.
    with Dovecot(USERS, tls=False, extra_config=PENALTY_ON) as server:
        url = server.url("imap")
        assert verify(url, "alice", "guess-1", smtp_client(ATTACKER)).verdict is Verdict.REJECT
        started = time.monotonic()
        assert verify(url, "bob", "builder", smtp_client(HONEST)).verdict is Verdict.ACCEPT
        assert time.monotonic() - started > 3.0  # Dovecot's 4 s, meant for the attacker


# -- the default timeout outlasts Dovecot's longest penalty -------------------------------


def test_default_timeout_outlasts_dovecots_longest_penalty() -> None:
    # AUTH_PENALTY_MAX_SECS (15 s) plus auth_failure_delay (2 s by default); and the
    # chain's per-backend timeout (--auth-timeout) must not cut the dialogue short.
    assert 17.0 < DEFAULT_TIMEOUT < Config().auth_timeout
    for url in ("imap://192.0.2.1", "pop3://192.0.2.1", "apop://192.0.2.1"):
        assert getattr(backend(url), "server").timeout == DEFAULT_TIMEOUT
    # what --help and README's table say
    for kind, url in ((IMAP, "imap://192.0.2.1"), (POP3, "pop3://192.0.2.1")):
        assert kind.settings(BackendSpec(kind=kind.kind, arg=url))["timeout"] == DEFAULT_TIMEOUT


@pytest.mark.parametrize(
    ("args", "warned"),
    [
        (["-R", "pop3://192.0.2.1"], False),
        (["-R", "pop3://192.0.2.1", "--auth-timeout", "15"], True),
        (["-R", "imap://192.0.2.1?timeout=40"], True),
    ],
)
def test_check_config_warns_when_the_chain_would_cut_a_backend_short(
    args: list[str], warned: bool
) -> None:
    checked = subprocess.run(
        [*ofmipd_command("--check-config", *args)],
        capture_output=True, text=True, env=server_env(), timeout=60,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    said = "is not shorter than --auth-timeout" in checked.stdout + checked.stderr
    assert said is warned, checked.stdout + checked.stderr


# -- stand-in servers: what Dovecot never says --------------------------------------------

Script = Callable[[bytes], bytes]


async def stand_in(
    greeting: bytes, script: Script, run: Callable[[int], Awaitable[None]]
) -> list[bytes]:
    """A server that greets, answers each line with script(line) and hangs up after an
    empty answer; returns the lines it received."""
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting + b"\r\n")
        while line := (await reader.readline()).rstrip(b"\r\n"):
            received.append(line)
            answer = script(line)
            if not answer:
                break
            writer.write(answer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        await run(server.sockets[0].getsockname()[1])
    return received


def imap_script(id_answer: bytes) -> Script:
    def answer(line: bytes) -> bytes:
        tag, command = line.split(b" ")[:2]
        if command == b"ID":  # the server's own ID data, with a literal in it
            return b'* ID ("name" "stand-in" "x" {3}\r\nabc)\r\n' + tag + b" " + id_answer
        if command == b"LOGIN":
            return tag + b" OK logged in\r\n"
        return b""  # LOGOUT

    return answer


def pop3_script(xclient_answer: bytes) -> Script:
    def answer(line: bytes) -> bytes:
        command = line.split(b" ")[0]
        if command == b"XCLIENT":
            return xclient_answer
        if command == b"CAPA":
            return b"+OK\r\nUSER\r\n.\r\n"
        if command in (b"USER", b"PASS"):
            return b"+OK\r\n"
        return b""  # QUIT

    return answer


def converse(
    greeting: bytes, script: Script, scheme: str, client: ClientIdentity
) -> tuple[Outcome, list[bytes]]:
    outcomes: list[Outcome] = []

    async def run(port: int) -> None:
        remote = backend(f"{scheme}://127.0.0.1:{port}")
        outcomes.append(await remote.verify("alice", Secret(b"wonderland"), client))

    received = asyncio.run(stand_in(greeting, script, run))
    return outcomes[0], received


IMAP_GREETING = b"* OK [CAPABILITY IMAP4rev1 ID AUTH=PLAIN] stand-in ready"
POP3_GREETING = b"+OK [XCLIENT] stand-in ready"


@pytest.mark.parametrize("id_answer", [b"OK done\r\n", b"NO not from you\r\n", b"BAD what\r\n"])
def test_imap_login_goes_on_whatever_id_gets(id_answer: bytes) -> None:
    client = smtp_client(CLIENT, 4711)
    outcome, received = converse(IMAP_GREETING, imap_script(id_answer), "imap", client)
    assert outcome.verdict is Verdict.ACCEPT, outcome
    assert received[:2] == [
        b'i0 ID ("x-originating-ip" "192.0.2.10" "x-originating-port" "4711" '
        b'"x-connected-ip" "192.0.2.25" "x-connected-port" "587")',
        b'a1 LOGIN "alice" "wonderland"',
    ]


def test_imap_id_is_sent_only_when_offered() -> None:
    greeting = b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] no ID here"
    outcome, received = converse(greeting, imap_script(b""), "imap", smtp_client(CLIENT))
    assert outcome.verdict is Verdict.ACCEPT
    assert received[0] == b'a1 LOGIN "alice" "wonderland"'


def test_imap_garbage_answer_to_id_tempfails_before_the_password() -> None:
    client = smtp_client(CLIENT)
    outcome, received = converse(IMAP_GREETING, imap_script(b"MAYBE\r\n"), "imap", client)
    assert outcome.verdict is Verdict.TEMPFAIL
    assert outcome.reason.endswith("unexpected IMAP response to ID")
    assert not any(b"LOGIN" in line for line in received)


@pytest.mark.parametrize(
    "xclient_answer", [b"+OK Updated\r\n", b"-ERR Invalid parameters\r\n", b"-ERR [SYS/TEMP]\r\n"]
)
def test_pop3_login_goes_on_whatever_xclient_gets(xclient_answer: bytes) -> None:
    client = smtp_client("::ffff:192.0.2.10", 4711)
    outcome, received = converse(POP3_GREETING, pop3_script(xclient_answer), "pop3", client)
    assert outcome.verdict is Verdict.ACCEPT, outcome
    assert received[:3] == [b"CAPA", b"XCLIENT ADDR=192.0.2.10 PORT=4711", b"USER alice"]


def test_pop3_xclient_is_sent_only_when_the_greeting_offers_it() -> None:
    client = smtp_client(CLIENT)
    outcome, received = converse(b"+OK stand-in ready", pop3_script(b""), "pop3", client)
    assert outcome.verdict is Verdict.ACCEPT
    assert received[0] == b"CAPA"


def test_pop3_garbage_answer_to_xclient_tempfails_before_the_password() -> None:
    client = smtp_client(CLIENT)
    outcome, received = converse(POP3_GREETING, pop3_script(b"* OK\r\n"), "pop3", client)
    assert outcome.verdict is Verdict.TEMPFAIL
    assert outcome.reason.endswith("unexpected POP3 response to XCLIENT")
    assert received == [b"CAPA", b"XCLIENT ADDR=192.0.2.10 PORT=40123"]


@pytest.mark.parametrize(
    "odd",
    [
        '192.0.2.1" "x-originating-ip" "203.0.113.9',
        "192.0.2.1\r\na1 LOGIN mallory x",
        "192.0.2.1 ADDR=203.0.113.9",
        "",
    ],
)
def test_odd_addresses_are_left_out(odd: str) -> None:
    client = smtp_client(odd)._replace(local_ip=odd)
    assert client_address(client) is None
    _, imap = converse(IMAP_GREETING, imap_script(b"OK\r\n"), "imap", client)
    assert imap[0] == b'a1 LOGIN "alice" "wonderland"'
    _, pop3 = converse(POP3_GREETING, pop3_script(b"+OK\r\n"), "pop3", client)
    assert pop3[0] == b"CAPA"


def test_zone_index_and_what_follows_it_are_dropped() -> None:
    client = smtp_client("fe80::1%eth0 ADDR=203.0.113.9")._replace(local_ip="fe80::2%x", port=0)
    _, imap = converse(IMAP_GREETING, imap_script(b"OK\r\n"), "imap", client)
    assert imap[0] == (
        b'i0 ID ("x-originating-ip" "fe80::1" "x-connected-ip" "fe80::2" "x-connected-port" "587")'
    )
    _, pop3 = converse(POP3_GREETING, pop3_script(b"+OK\r\n"), "pop3", client)
    assert pop3[:2] == [b"CAPA", b"XCLIENT ADDR=fe80::1"]


def test_imap_quoted_strings_escape_and_refuse() -> None:
    assert quoted('a"b\\c') == b'"a\\"b\\\\c"'
    for bad in ("a\r\nb", "a\0b", "wörd"):
        with pytest.raises(ValueError):
            quoted(bad)
