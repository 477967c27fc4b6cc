"""--check-header-from: every address of every From and Sender field must be one the
sender map allows the login; anything the check cannot read unambiguously is refused."""

from __future__ import annotations

import smtplib
import subprocess
from pathlib import Path

import pytest

from ofmipd.header_from import forged_address
from ofmipd.senders import SenderMap
from tests.ofmipd_server import (
    CAPTURE,
    authfile,
    captured_messages,
    ofmipd_command,
    server_env,
    start_daemon,
)

PASSWORD = "Header-From-3"
SENDERS = SenderMap.from_text(
    "alice alice@example.org, @alice.example, ålice@exämple.org\n", "senders"
)


def check(header: bytes) -> str | None:
    return forged_address(header + b"\r\n\r\nbody\r\n", "alice", SENDERS)


@pytest.mark.parametrize(
    "header",
    [
        b"From: alice@example.org",
        b"From: Alice <alice@example.org>",
        b"FROM: ALICE@Example.ORG",
        b"From : alice@example.org",
        b"From: any@alice.example\r\nSender: alice@example.org",
        b"From: =?utf-8?q?Al=C3=AFce?= <alice@example.org>",
        b"From: alice@example.org (a comment)",
        b"From: Alice\r\n <alice@example.org>",
        b"Subject: no From at all",
        "From: Ålice <ålice@exämple.org>".encode(),  # RFC 6532 UTF-8 header
    ],
)
def test_own_addresses_pass(header: bytes) -> None:
    assert check(header) is None


@pytest.mark.parametrize(
    "header",
    [
        b"From: boss@example.org",
        b'From: "alice@example.org" <boss@example.org>',  # the display name looks right
        b"From: =?utf-8?q?alice=40example.org?= <boss@example.org>",
        b"From: alice@example.org, boss@example.org",  # several From addresses
        b"From: team: alice@example.org, boss@example.org;",  # a group
        b"From: alice@example.org\r\nFrom: boss@example.org",  # a second From field
        b"From: alice@example.org\r\nSender: boss@example.org",
        b"From: alice@example.org\r\nsender : boss@example.org",
        b"From: alice@example.org\r\n\t, boss@example.org",  # folded in
        b"From: alice@ex\xd0\xb0mple.org",  # Cyrillic a
        b"From: alice@example.org.evil",
        b"From: =?utf-8?q?alice=40example.org?=",  # an encoded word where the address is
        b'From: "alice@example.org"@evil.example',
        b"From: alice@example.org <boss@example.org>",
        b"From: <alice@example.org> <boss@example.org>",
        b"From: boss@example.org <alice@example.org>",
        b"From: undisclosed:;",
        b"From: <>",
        b"From:",
        b"From: alice",
        b"From: alice@example.org\xffx",
        "From: a\u030alice@exämple.org".encode(),  # decomposed å: not the map's address
    ],
)
def test_forged_or_ambiguous_from_is_refused(header: bytes) -> None:
    assert check(header) is not None


def test_from_in_the_body_is_not_the_header() -> None:
    message = b"From: alice@example.org\r\n\r\nFrom: boss@example.org\r\n"
    assert forged_address(message, "alice", SENDERS) is None


@pytest.fixture
def users(tmp_path: Path) -> Path:
    return authfile(tmp_path, f"alice:{PASSWORD}\n")


def test_daemon_refuses_forged_header_from_after_data(
    tmp_path: Path, users: Path, capture: Path
) -> None:
    senders = tmp_path / "senders"
    senders.write_text("alice alice@example.org\n")
    args = ("--sender-map", str(senders), "--check-header-from")
    with start_daemon(tmp_path, users, capture, *args) as server:
        with smtplib.SMTP(server.host, server.port, timeout=20) as client:
            client.login("alice", PASSWORD)
            forged = b"From: Alice <boss@example.org>\r\n\r\nhi\r\n"
            with pytest.raises(smtplib.SMTPDataError) as refused:
                client.sendmail("alice@example.org", ["to@example.net"], forged)
            assert refused.value.smtp_code == 550
            assert refused.value.smtp_error.startswith(b"5.7.1 ")
            client.sendmail(
                "alice@example.org", ["to@example.net"], b"From: alice@example.org\r\n\r\nok\r\n"
            )
        assert "may not use header From/Sender boss@example.org" in server.log_text()
    ((_, delivered),) = captured_messages(capture)
    assert delivered.endswith(b"\r\n\r\nok\r\n")


def test_daemon_without_the_flag_delivers_any_header_from(
    tmp_path: Path, users: Path, capture: Path
) -> None:
    senders = tmp_path / "senders"
    senders.write_text("alice alice@example.org\n")
    with start_daemon(tmp_path, users, capture, "--sender-map", str(senders)) as server:
        with smtplib.SMTP(server.host, server.port, timeout=20) as client:
            client.login("alice", PASSWORD)
            client.sendmail("alice@example.org", ["t@example.net"], b"From: b@x.org\r\n\r\nhi\r\n")
    assert len(captured_messages(capture)) == 1


def test_check_header_from_without_sender_map_is_a_config_error(users: Path) -> None:
    result = subprocess.run(
        ofmipd_command("--check-config", "-a", str(users), "--sendmail", CAPTURE,
                       "--check-header-from"),
        capture_output=True, text=True, env=server_env(), timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "--check-header-from needs --sender-map" in result.stderr
