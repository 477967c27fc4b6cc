"""One identity per session, decided once: the door, then the store's canonical name.

A real daemon, a real slapd and the capture injector: whatever variant of "alice" a
client types, it either gets 535 at the door or becomes exactly alice for the sender map,
the injector's LOGIN, the Received header and the logs.
"""

from __future__ import annotations

import base64
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import ldap_server
from tests.conftest import free_port
from tests.ldap_server import PEOPLE, Slapd
from tests.ofmipd_server import CAPTURE, ROOT, Daemon, captured_messages, server_env

slapd_module = ldap_server.slapd_module

FORGED = "auth reject: client=203.0.113.9 user=x mechanism=PLAIN backend=authfile reason='x'"
# Each binds as alice through slapd's matching rules (spaces dropped, case and width folded).
REFUSED_AT_THE_DOOR = {
    "alice ": "leading or trailing whitespace in user name",
    " alice": "leading or trailing whitespace in user name",
    "Alice\t": "control character in user name",
    "alice\u00a0": "leading or trailing whitespace in user name",  # NBSP
    f"alice\n{FORGED}": "control character in user name",
    f"alice\u2028{FORGED}": "control character in user name",
}
BECOME_ALICE = ("\uff41\uff4c\uff49\uff43\uff45", "AL\u0130CE", "ALICE", "alice")


def settled_log(daemon: Daemon, sessions: int) -> str:
    """The daemon's log once `sessions` sessions have logged their end line."""
    deadline = time.monotonic() + 10
    while True:
        log = daemon.log_text()
        if log.count(" end client=") >= sessions or time.monotonic() > deadline:
            return log
        time.sleep(0.05)


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


@pytest.fixture(params=["dn-template", "search-then-bind"])
def daemon(
    request: pytest.FixtureRequest, slapd_module: Slapd, tmp_path: Path, capture: Path
) -> Iterator[Daemon]:
    senders = tmp_path / "senders"
    senders.write_text("alice  alice@example.org\n*      @example.org\n")
    if request.param == "dn-template":
        auth = ["-R", f"{slapd_module.uri}/uid=%s,{PEOPLE}"]
    else:
        config = tmp_path / "ofmipd.toml"
        config.write_text(
            f'[[auth]]\nkind = "ldap"\nuri = "{slapd_module.uri}"\nbase = "{PEOPLE}"\n'
            f'bind_dn = "{slapd_module.service_dn}"\n'
            f'bind_password_file = "{slapd_module.service_password_file}"\n'
            'filter = "(&(objectClass=inetOrgPerson)(|(uid=%s)(mail=%s)))"\n'
        )
        auth = ["--config", str(config)]
    port = free_port()
    args = ["-p", f"127.0.0.1:{port}", "--hostname", "mx.test", *auth]
    args += ["--sendmail", CAPTURE, "--sender-map", str(senders)]
    args += ["--ratelimit", "off"]  # many refused variants from one address, on purpose
    with Daemon(args, port, tmp_path, env=server_env(CAPTURE_DIR=str(capture))) as running:
        yield running


def test_door_refuses_variants_of_alice_with_spaces_or_controls(daemon: Daemon) -> None:
    for typed in REFUSED_AT_THE_DOOR:
        with smtplib.SMTP(daemon.host, daemon.port, timeout=20) as s:
            s.ehlo("client.test")
            code, reply = s.docmd("AUTH", f"PLAIN {plain(typed, 'alice-pw')}")
            assert (code, reply[:5]) == (535, b"5.7.8"), typed
    # One more session: the start-up check that the port is open.
    log = settled_log(daemon, 1 + len(REFUSED_AT_THE_DOOR))
    for typed, why in REFUSED_AT_THE_DOOR.items():
        escaped = typed.encode("unicode_escape").decode().replace("\\t", "\\x09")
        escaped = escaped.replace("\\n", "\\x0a")
        assert (
            f"auth reject: client=127.0.0.1 user={escaped} mechanism=PLAIN backend=door"
            f" reason='malformed credentials: {why}'" in log
        ), (typed, log)
    # The forged text stays inside its escaped user= field: one event, one line.
    for line in log.splitlines():
        assert line.isprintable(), line
        if "auth reject: " in line:
            assert line.partition("auth reject: ")[2].startswith("client=127.0.0.1 "), line


def test_folded_variants_of_alice_are_alice_everywhere(daemon: Daemon, capture: Path) -> None:
    for number, typed in enumerate(BECOME_ALICE):
        with smtplib.SMTP(daemon.host, daemon.port, timeout=20) as s:
            s.ehlo("client.test")
            assert s.docmd("AUTH", f"PLAIN {plain(typed, 'alice-pw')}")[0] == 235, typed
            # The sender map applies to alice, not to the name as typed (which has no line
            # and would fall back to "*": any @example.org address).
            code, reply = s.docmd("MAIL", "FROM:<ceo@example.org>")
            assert code == 553, (typed, reply)
            assert reply.startswith(b"5.7.1 <ceo@example.org>: Sender address not owned by user")
            assert reply.endswith(b" alice")
            s.sendmail("alice@example.org", ["rcpt@example.net"], f"Subject: {number}\r\n\r\nx\r\n")
    delivered = captured_messages(capture)
    assert len(delivered) == len(BECOME_ALICE)
    for env, message in delivered:
        assert "LOGIN=alice\n" in env
        assert b"\t(authenticated user alice)\r\n" in message.split(b"\r\n\r\n")[0]
    log = settled_log(daemon, 1 + len(BECOME_ALICE))
    accepted = [line for line in log.splitlines() if "auth accept:" in line]
    assert len(accepted) == len(BECOME_ALICE)
    assert all(" user=alice mechanism=PLAIN backend=ldap " in line for line in accepted)
    ends = [line for line in log.splitlines() if " end client=" in line]
    assert sum(" user=alice backend=ldap messages=1 " in line for line in ends) == len(BECOME_ALICE)
    messages = [line for line in log.splitlines() if ": message " in line]
    assert len(messages) == len(BECOME_ALICE)
    assert all(" user=alice result=250" in line for line in messages)


def test_tempfail_log_line_names_the_backend_that_failed(tmp_path: Path, capture: Path):
    # LDAP down, then a checkpassword program that fails temporarily too: 454, and the log
    # names LDAP, the first backend that could not answer, not the last one asked.
    dead = f"ldap://127.0.0.1:{free_port()}/uid=%s,{PEOPLE}"
    later = f"{ROOT / 'tests' / 'checkpw_progs' / 'exit-code'} 111"
    port = free_port()
    args = ["-p", f"127.0.0.1:{port}", "-R", dead, "-A", later, "--sendmail", CAPTURE]
    with Daemon(args, port, tmp_path, env=server_env(CAPTURE_DIR=str(capture))) as daemon:
        with smtplib.SMTP(daemon.host, daemon.port, timeout=30) as s:
            s.ehlo("client.test")
            assert s.docmd("AUTH", f"PLAIN {plain('mallory', 'pw')}")[0] == 454
        log = daemon.log_text()
    (line,) = [line for line in log.splitlines() if "auth tempfail:" in line]
    assert " user=mallory mechanism=PLAIN backend=ldap reason='LDAP " in line, line
