"""Remote IMAP/POP3 checks when things go wrong: every outage is TEMPFAIL, never REJECT.

Real parts: a Dovecot that is stopped, a Dovecot whose own password backend fails, a
Dovecot that refuses plaintext logins, a listening socket that never answers, and one
protocol's server asked in the other protocol.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from auth_backends import BackendSpec, create, kind_for_url
from ofmipd.auth import Outcome, Secret, Verdict
from ofmipd.identity import ClientIdentity
from tests.conftest import free_port
from tests.dovecot_server import Dovecot

SCHEMES = ("imap", "pop3", "apop")


def verify(url: str, user: str, password: str, client: ClientIdentity) -> Outcome:
    backend = create(BackendSpec(kind=kind_for_url(url), arg=url))
    return asyncio.run(backend.verify(user, Secret(password.encode()), client))


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    with Dovecot({"alice": "wonderland"}, tls=False) as server:
        yield server


@pytest.mark.slow
def test_stopped_server_tempfails_quickly(client: ClientIdentity) -> None:
    with Dovecot({"alice": "wonderland"}, tls=False) as server:
        for scheme in SCHEMES:
            assert verify(server.url(scheme), "alice", "wonderland", client).verdict is (
                Verdict.ACCEPT
            )
        server.stop()
        for scheme in SCHEMES:
            started = time.monotonic()
            outcome = verify(server.url(scheme), "alice", "wonderland", client)
            assert outcome.verdict is Verdict.TEMPFAIL, outcome
            assert outcome.reason.endswith("connection refused")
            assert time.monotonic() - started < 2.0
        server.start()  # and back: the same URL works again
        assert verify(server.url("imap"), "alice", "wonderland", client).verdict is (Verdict.ACCEPT)


@pytest.mark.parametrize("scheme", SCHEMES + ("imaps", "pop3s"))
def test_black_hole_tempfails_after_the_timeout(scheme: str, client: ClientIdentity) -> None:
    # The kernel completes the handshake into the backlog; nobody ever accepts or speaks.
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(8)
        url = f"{scheme}://127.0.0.1:{hole.getsockname()[1]}?timeout=1"
        if scheme.endswith("s"):
            url += "&verify=false"
        started = time.monotonic()
        outcome = verify(url, "alice", "wonderland", client)
        elapsed = time.monotonic() - started
    assert outcome.verdict is Verdict.TEMPFAIL
    assert outcome.reason.endswith("no answer within 1s")
    assert 0.9 < elapsed < 5.0


@pytest.mark.parametrize(
    ("scheme", "other", "complaint"),
    [
        ("imap", "pop3", "not an IMAP greeting: '+OK"),
        ("pop3", "imap", "not a POP3 greeting: '* OK"),
        ("apop", "imap", "not a POP3 greeting: '* OK"),
    ],
)
def test_protocol_garbage_tempfails(
    dovecot: Dovecot, client: ClientIdentity, scheme: str, other: str, complaint: str
) -> None:
    url = f"{scheme}://127.0.0.1:{dovecot.ports[other]}?timeout=5"
    outcome = verify(url, "alice", "wonderland", client)
    assert outcome.verdict is Verdict.TEMPFAIL
    assert complaint in outcome.reason


def test_server_closing_at_once_tempfails(client: ClientIdentity) -> None:
    async def run() -> Outcome:
        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        backend = create(BackendSpec(kind="imap", arg=f"imap://127.0.0.1:{port}"))
        async with server:
            return await backend.verify("alice", Secret(b"wonderland"), client)

    outcome = asyncio.run(run())
    assert outcome.verdict is Verdict.TEMPFAIL
    assert outcome.reason.endswith("server closed the connection")


@pytest.mark.slow
def test_remote_password_backend_down_tempfails(tmp_path: Path, client: ClientIdentity) -> None:
    # Dovecot's own passdb fails (checkpassword exit 111 = temporary failure): IMAP says
    # NO [UNAVAILABLE], POP3 -ERR [SYS/TEMP]. The user's password may be right.
    broken = tmp_path / "checkpassword-down"
    broken.write_text("#!/bin/sh\nexit 111\n")
    broken.chmod(0o755)
    os.chmod(tmp_path, 0o755)
    config = f"passdb {{\n  driver = checkpassword\n  args = {broken}\n}}\n"
    with Dovecot({}, tls=False, extra_config=config) as server:
        expected = {"imap": "IMAP NO [UNAVAILABLE]", "pop3": "-ERR [SYS/TEMP] to PASS",
                    "apop": "-ERR [SYS/TEMP] to APOP"}  # fmt: skip
        for scheme, said in expected.items():
            outcome = verify(server.url(scheme), "alice", "wonderland", client)
            assert outcome.verdict is Verdict.TEMPFAIL, outcome
            assert said in outcome.reason


def test_server_refusing_plaintext_gets_no_password(client: ClientIdentity) -> None:
    # Dovecot refuses plaintext logins on connections it does not consider secure: not TLS,
    # and local address != remote address (we connect from 127.0.0.1 to 127.0.0.5). It says
    # so before the login (IMAP LOGINDISABLED, POP3 CAPA without USER), so the password
    # stays here and the verdict is TEMPFAIL. (tls=none: with the default, auto, ofmipd
    # would upgrade with STARTTLS first; tests/test_remote_tls.py shows that.)
    with Dovecot(
        {"alice": "wonderland"},
        addresses=("127.0.0.5",),
        extra_config="disable_plaintext_auth = yes\n",
    ) as server:
        imap = verify(server.url("imap") + "?tls=none", "alice", "wonderland", client)
        assert imap.verdict is Verdict.TEMPFAIL
        assert "LOGINDISABLED" in imap.reason
        pop3 = verify(server.url("pop3") + "?tls=none", "alice", "wonderland", client)
        assert pop3.verdict is Verdict.TEMPFAIL
        assert "does not offer USER" in pop3.reason
        log = server.logs()
        assert "user=<alice>" not in log  # no login was even attempted
        for scheme in ("imaps", "pop3s"):
            url = server.url(scheme) + "?verify=false"
            assert verify(url, "alice", "wonderland", client).verdict is Verdict.ACCEPT


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(
    ("user", "password"),
    [("alice\r\na2 LOGOUT", "wonderland"), ("alice", "wonder\r\nland"), ("alice", "x\nUSER")],
)
def test_line_breaks_never_reach_the_wire(
    scheme: str, user: str, password: str, client: ClientIdentity
) -> None:
    # Nothing listens on the port: had a connection been tried, the answer would be
    # TEMPFAIL "connection refused"; a REJECT proves the check came first.
    outcome = verify(f"{scheme}://127.0.0.1:{free_port()}", user, password, client)
    assert outcome.verdict is Verdict.REJECT
    assert outcome.reason == "malformed credentials: control character"
