"""tmda's ipauthmap with real servers: the local address the client reached picks the Dovecot.

Two Dovecots know "alice" with different passwords: A (127.0.0.1 and ::1) says "alpha",
B (127.0.0.4) says "beta". Which password is accepted shows which server was asked.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from auth_backends import BackendSpec, create
from ofmipd.auth import Authenticator, Outcome, Secret, Verdict
from ofmipd.identity import ClientIdentity
from tests.conftest import free_port
from tests.dovecot_server import Dovecot


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[Dovecot, Dovecot]]:
    with Dovecot({"alice": "alpha"}, addresses=("127.0.0.1", "::1"), tls=False) as a:
        with Dovecot({"alice": "beta"}, addresses=("127.0.0.4",), tls=False) as b:
            yield a, b


def write_map(path: Path, text: str) -> None:
    # Replace, as an admin's editor or `mv` would: the new inode is noticed even when
    # the modification time has not ticked.
    fresh = path.with_suffix(".new")
    fresh.write_text(text)
    os.replace(fresh, path)


@pytest.fixture
def ipmap(tmp_path: Path, servers: tuple[Dovecot, Dovecot]) -> Path:
    a, b = servers
    path = tmp_path / "ipauthmap"
    write_map(
        path,
        f"""# local address -> server
127.0.0.2 127.0.0.1 {a.ports["imap"]}       # new form
127.0.0.3:127.0.0.4:{b.ports["imap"]}        # tmda's old form
::1 ::1 {a.ports["imap"]}
::ffff:127.0.0.6 127.0.0.4 {b.ports["pop3"]}
""",
    )
    return path


def at(local_ip: str) -> ClientIdentity:
    return ClientIdentity(ip="192.0.2.7", port=40000, local_ip=local_ip, local_port=587)


def verify(backend: Authenticator, password: str, local_ip: str) -> Outcome:
    return asyncio.run(backend.verify("alice", Secret(password.encode()), at(local_ip)))


def test_local_address_selects_the_imap_server(
    servers: tuple[Dovecot, Dovecot], ipmap: Path
) -> None:
    a, b = servers
    backend = create(BackendSpec(kind="imap", arg=f"imap://0.0.0.0?ipauthmap={ipmap}"))
    assert backend.target == f"imap://0.0.0.0:143 ipauthmap={ipmap}"

    via_2 = verify(backend, "alpha", "127.0.0.2")
    assert via_2.verdict is Verdict.ACCEPT
    assert via_2.reason.startswith(f"127.0.0.1:{a.ports['imap']}: ")
    assert verify(backend, "beta", "127.0.0.2").verdict is Verdict.REJECT

    via_3 = verify(backend, "beta", "127.0.0.3")
    assert via_3.verdict is Verdict.ACCEPT
    assert via_3.reason.startswith(f"127.0.0.4:{b.ports['imap']}: ")
    assert verify(backend, "alpha", "127.0.0.3").verdict is Verdict.REJECT

    via_v6 = verify(backend, "alpha", "::1")
    assert via_v6.verdict is Verdict.ACCEPT
    assert via_v6.reason.startswith(f"[::1]:{a.ports['imap']}: ")


def test_local_address_selects_the_pop3_server_from_toml(
    servers: tuple[Dovecot, Dovecot], tmp_path: Path
) -> None:
    a, b = servers
    path = tmp_path / "pop3map"
    write_map(path, f"127.0.0.2 127.0.0.1 {a.ports['pop3']}\n127.0.0.3 127.0.0.4\n")
    # No port in the map for 127.0.0.3: the URL's port applies, as in tmda.
    options = {"url": f"apop://0.0.0.0:{b.ports['pop3']}", "ipauthmap": str(path), "timeout": 5}
    backend = create(BackendSpec(kind="pop3", options=options))
    assert verify(backend, "alpha", "127.0.0.2").verdict is Verdict.ACCEPT
    assert verify(backend, "beta", "127.0.0.2").verdict is Verdict.REJECT
    assert verify(backend, "beta", "127.0.0.3").verdict is Verdict.ACCEPT
    assert verify(backend, "alpha", "127.0.0.3").verdict is Verdict.REJECT


def test_ipv4_mapped_map_key_matches_the_ipv4_client(
    servers: tuple[Dovecot, Dovecot], ipmap: Path
) -> None:
    backend = create(BackendSpec(kind="pop3", arg=f"pop3://0.0.0.0?ipauthmap={ipmap}"))
    assert verify(backend, "beta", "127.0.0.6").verdict is Verdict.ACCEPT
    assert verify(backend, "beta", "::ffff:127.0.0.6").verdict is Verdict.ACCEPT


def test_unmapped_local_address_falls_back_to_localhost_like_tmda(
    servers: tuple[Dovecot, Dovecot], ipmap: Path
) -> None:
    a, _ = servers
    url = f"imap://0.0.0.0:{a.ports['imap']}?ipauthmap={ipmap}"
    backend = create(BackendSpec(kind="imap", arg=url))
    outcome = verify(backend, "alpha", "127.0.0.9")
    assert outcome.verdict is Verdict.ACCEPT
    assert outcome.reason.startswith(f"127.0.0.1:{a.ports['imap']}: ")
    unknown = verify(backend, "alpha", "")  # a pipe with no launcher environment
    assert unknown.verdict is Verdict.ACCEPT


def test_unmapped_local_address_tempfails_without_fallback(
    servers: tuple[Dovecot, Dovecot], ipmap: Path
) -> None:
    options = {"url": "imap://0.0.0.0", "ipauthmap": str(ipmap), "fallback": "none"}
    backend = create(BackendSpec(kind="imap", options=options))
    outcome = verify(backend, "alpha", "127.0.0.9")
    assert outcome.verdict is Verdict.TEMPFAIL
    assert outcome.reason == f"ipauthmap {ipmap}: no entry for local address 127.0.0.9"
    assert verify(backend, "alpha", "127.0.0.2").verdict is Verdict.ACCEPT


def test_map_is_reread_when_it_changes(servers: tuple[Dovecot, Dovecot], ipmap: Path) -> None:
    a, b = servers
    backend = create(BackendSpec(kind="imap", arg=f"imap://0.0.0.0?ipauthmap={ipmap}"))
    assert verify(backend, "alpha", "127.0.0.2").verdict is Verdict.ACCEPT

    write_map(ipmap, f"127.0.0.2 127.0.0.4 {b.ports['imap']}\n")
    assert verify(backend, "beta", "127.0.0.2").verdict is Verdict.ACCEPT
    assert verify(backend, "alpha", "127.0.0.2").verdict is Verdict.REJECT

    # A broken edit: logins routed by the map wait (TEMPFAIL) and the reason names the line.
    write_map(ipmap, f"127.0.0.2 127.0.0.4 {b.ports['imap']}\n127.0.0.3 nowhere! 143\n")
    broken = verify(backend, "beta", "127.0.0.2")
    assert broken.verdict is Verdict.TEMPFAIL
    assert broken.reason.startswith(f"ipauthmap {ipmap} line 2: ")

    ipmap.unlink()
    gone = verify(backend, "beta", "127.0.0.2")
    assert gone.verdict is Verdict.TEMPFAIL
    assert gone.reason == f"ipauthmap {ipmap}: No such file or directory"

    write_map(ipmap, f"127.0.0.2 127.0.0.1 {a.ports['imap']}\n")
    assert verify(backend, "alpha", "127.0.0.2").verdict is Verdict.ACCEPT


@pytest.mark.slow
def test_map_route_to_a_dead_server_tempfails(tmp_path: Path) -> None:
    path = tmp_path / "deadmap"
    write_map(path, f"127.0.0.2 127.0.0.1 {free_port()}\n")
    backend = create(BackendSpec(kind="imap", arg=f"imap://0.0.0.0?ipauthmap={path}"))
    outcome = verify(backend, "alpha", "127.0.0.2")
    assert outcome.verdict is Verdict.TEMPFAIL
    assert outcome.reason.endswith("connection refused")
