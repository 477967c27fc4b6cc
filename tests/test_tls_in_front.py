"""--tls-in-front believes only the TLS terminators it lists (default loopback), judged by
the transport peer; in one-session mode a socketpair or pipes is the trusted launcher."""

from __future__ import annotations

import base64
import smtplib
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.ofmipd_server import (
    CAPTURE,
    authfile,
    captured_messages,
    ofmipd_command,
    server_env,
    start_daemon,
)

PASSWORD = "Front-Pass-8"
PLAIN = base64.b64encode(f"\0ulla\0{PASSWORD}".encode())


@pytest.fixture
def users(tmp_path: Path) -> Path:
    return authfile(tmp_path, f"ulla:{PASSWORD}\n")


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    path = tmp_path / "rules"
    path.write_text("127.0.0.3 relay\n* require-tls\n")  # AUTH only over an encrypted channel
    return path


def session_from(host: str, port: int, source: str) -> smtplib.SMTP:
    client = smtplib.SMTP(host, port, timeout=20, source_address=(source, 0))
    client.ehlo("front.test")
    return client


def end_line(log: str, source: str) -> str:
    (line,) = [x for x in log.splitlines() if f": end client={source} " in x]
    return line


def test_only_a_listed_peer_counts_as_a_tls_terminator(tmp_path, users, rules, capture):
    with start_daemon(
        tmp_path, users, capture, "--tls-in-front", "127.0.0.2/32", "--rules", str(rules)
    ) as daemon:
        with session_from(daemon.host, daemon.port, "127.0.0.2") as trusted:
            assert trusted.has_extn("auth")
            assert trusted.login("ulla", PASSWORD)[0] == 235
            trusted.sendmail("ulla@example.org", ["a@example.net"], b"Subject: 1\r\n\r\nhi\r\n")
        with session_from(daemon.host, daemon.port, "127.0.0.4") as stranger:
            assert not stranger.has_extn("auth")
            assert stranger.docmd("AUTH", f"PLAIN {PLAIN.decode()}")[0] == 530
        with session_from(daemon.host, daemon.port, "127.0.0.3") as relay:
            relay.sendmail("r@example.org", ["b@example.net"], b"Subject: 2\r\n\r\nhi\r\n")
        time.sleep(0.3)
        log = daemon.log_text()
    first, second = (message for _, message in captured_messages(capture))
    if b"Subject: 2" in first:
        first, second = second, first
    assert b"with ESMTPSA" in first.split(b"Subject:")[0]
    assert b"with ESMTP id" in second.split(b"Subject:")[0]  # no S: nothing encrypted it
    assert " tls=yes " in end_line(log, "127.0.0.2")
    assert " tls=no " in end_line(log, "127.0.0.4")
    assert " tls=no " in end_line(log, "127.0.0.3")
    # No list: loopback, what conf/ recipes and tmda-ofmipd's bare --tls-in-front mean.
    with start_daemon(tmp_path, users, capture, "--tls-in-front", "--rules", str(rules)) as bare:
        with session_from(bare.host, bare.port, "127.0.0.9") as local:
            assert local.login("ulla", PASSWORD)[0] == 235


def one_session(args: list[str], stdin: object, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ofmipd_command("-1", "--hostname", "mx.test", "--sendmail", CAPTURE, *args),
        stdin=stdin,
        stdout=stdin,
        stderr=subprocess.PIPE,
        env=server_env(**env),
    )


def converse(sock: socket.socket) -> list[bytes]:
    """Banner, EHLO, AUTH PLAIN, QUIT; the last line of each reply."""
    reader = sock.makefile("rb")
    replies = []
    for command in (None, b"EHLO one.test", b"AUTH PLAIN " + PLAIN, b"QUIT"):
        if command is not None:
            sock.sendall(command + b"\r\n")
        while (line := reader.readline())[3:4] == b"-":
            pass
        replies.append(line)
    return replies


def test_one_session_trusts_its_launchers_socketpair_and_judges_a_tcp_peer(tmp_path, users, rules):
    args = ["-a", str(users), "--rules", str(rules), "--tls-in-front", "10.0.0.0/8"]
    ours, theirs = socket.socketpair()  # stunnel's exec: no IP peer, the launcher itself
    process = one_session(args, theirs, REMOTE_HOST="192.0.2.44")
    theirs.close()
    ours.settimeout(20)
    over_pair = converse(ours)
    assert process.wait(20) == 0
    pair_log = process.stderr.read().decode() if process.stderr else ""
    ours.close()

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname(), timeout=20)
    conn, _ = listener.accept()
    # The launcher says the client is in 10/8; the peer that would encrypt is 127.0.0.1.
    process = one_session(args, conn, TCPREMOTEIP="10.1.2.3")
    conn.close()
    listener.close()
    over_tcp = converse(client)
    assert process.wait(20) == 0
    tcp_log = process.stderr.read().decode() if process.stderr else ""
    client.close()

    assert over_pair[2].startswith(b"235 "), over_pair
    assert "end client=192.0.2.44 " in pair_log and " tls=yes " in pair_log, pair_log
    assert over_tcp[2].startswith(b"530 5.7.0"), over_tcp
    assert "end client=10.1.2.3 " in tcp_log and " tls=no " in tcp_log, tcp_log


@pytest.mark.parametrize(
    ("setting", "shown"),
    [
        ("tls_in_front = true", "TLS terminated in front by 127.0.0.0/8,::1/128"),
        ('tls_in_front = ["192.0.2.0/28", "::1"]', "TLS terminated in front by 192.0.2.0/28,::1"),
        ('tls_in_front = "10.0.0.0/8, 127.0.0.1"', "in front by 10.0.0.0/8,127.0.0.1/32"),
    ],
)
def test_toml_tls_in_front(tmp_path, users, setting, shown):
    config = tmp_path / "ofmipd.toml"
    config.write_text(setting + "\n")
    result = subprocess.run(
        ofmipd_command("--check-config", "--config", str(config), "-a", str(users)),
        capture_output=True, text=True, timeout=60, env=server_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert shown in result.stdout, result.stdout


@pytest.mark.parametrize("value", ["10.0.0.1/8", "localhost", "", "10.0.0.0/8,,nope"])
def test_bad_tls_in_front_list_is_one_line_and_exit_2(users, value):
    result = subprocess.run(
        ofmipd_command("--check-config", "-a", str(users), "--tls-in-front", value),
        capture_output=True, text=True, timeout=60, env=server_env(),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "tls-in-front" in result.stderr, result.stderr
