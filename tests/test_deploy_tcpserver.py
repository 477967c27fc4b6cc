"""conf/tcpserver/run + conf/tcpserver/tcp.smtp: tcpserver with a tcprules cdb runs
`ofmipd -1`; RELAYCLIENT from the rules lets one address send without AUTH."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.deploy_support import (
    PASSWORD,
    USER,
    USERS_PATH,
    Workspace,
    instantiate,
    received,
    swaks,
    wait_for_banner,
)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Workspace, int]]:
    work = Workspace(tmp_path)
    rules = tmp_path / "tcp.smtp"
    rules.write_text(
        instantiate(
            "tcpserver/tcp.smtp",
            {
                '127.0.0.1:allow,RELAYCLIENT=""': '127.0.0.8:allow,RELAYCLIENT=""',
                "192.0.2.66:deny": "127.0.0.9:deny",
            },
        )
    )
    cdb = tmp_path / "tcp.smtp.cdb"
    with rules.open("rb") as source:
        subprocess.run(
            ["tcprules", str(cdb), str(tmp_path / "tcp.smtp.tmp")],
            stdin=source,
            check=True,
            timeout=30,
        )
    port = free_port()
    run = tmp_path / "run"
    run.write_text(
        instantiate(
            "tcpserver/run",
            work.replacements(
                **{
                    "ADDRESS=0.0.0.0": "ADDRESS=127.0.0.1",
                    "PORT=587": f"PORT={port}",
                    "USER=ofmipd": "USER=root",
                    "RULES=/etc/ofmipd/tcp.smtp.cdb": f"RULES={cdb}",
                    "STATE=/var/lib/ofmipd": f"STATE={tmp_path / 'lib-ofmipd'}",
                    USERS_PATH: str(work.users),
                }
            ),
        )
    )
    run.chmod(0o755)
    try:
        launched = work.start([str(run)], "tcpserver", cwd=tmp_path)
        wait_for_banner("127.0.0.1", port, launched)
        yield work, port
    finally:
        work.close()


def test_client_address_from_tcpserver_with_auth(served: tuple[Workspace, int]) -> None:
    work, port = served
    transcript = swaks(
        port,
        "--auth",
        "PLAIN",
        "--auth-user",
        USER,
        "--auth-password",
        PASSWORD,
        source_ip="127.0.0.7",
    )
    assert "<-  250 2.0.0 OK: queued as" in transcript, transcript
    (message,) = work.messages()
    header = received(message)
    assert "[127.0.0.7]" in header and "with ESMTPA" in header, header


def test_relayclient_from_rules_sends_without_auth(served: tuple[Workspace, int]) -> None:
    work, port = served
    transcript = swaks(port, source_ip="127.0.0.8")
    assert "<-  250 2.1.0 Sender OK" in transcript, transcript
    assert "<-  250 2.0.0 OK: queued as" in transcript, transcript
    (message,) = work.messages()
    header = received(message)
    assert "[127.0.0.8]" in header and "with ESMTP " in header, header


def test_other_client_needs_auth(served: tuple[Workspace, int]) -> None:
    work, port = served
    transcript = swaks(port, source_ip="127.0.0.7")
    assert "<** 530 5.7.0 Authentication required" in transcript, transcript
    assert work.messages() == []


def test_denied_client_is_dropped_before_ofmipd(served: tuple[Workspace, int]) -> None:
    _, port = served
    with socket.socket() as sock:
        sock.bind(("127.0.0.9", 0))
        sock.settimeout(30)
        sock.connect(("127.0.0.1", port))
        assert sock.recv(100) == b""  # no banner: tcpserver closed it


@pytest.mark.slow
def test_one_session_processes_share_the_guessing_limit_in_the_state_dir(
    served: tuple[Workspace, int],
) -> None:
    work, port = served
    replies = []
    for _ in range(6):  # a new ofmipd -1 for each connection
        transcript = swaks(
            port, "--auth", "PLAIN", "--auth-user", USER, "--auth-password", "guess",
            source_ip="127.0.0.7",
        )  # fmt: skip
        replies.append("535 5.7.8" in transcript and "454 4.7.0" not in transcript)
    assert replies == [True] * 5 + [False]  # the sixth process knew of the five failures
    state = work.root / "lib-ofmipd"
    assert state.stat().st_mode & 0o777 == 0o700  # made by the run script
    assert (state / "ofmipd.db").is_file()
