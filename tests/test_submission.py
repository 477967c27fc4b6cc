"""End to end: a real ofmipd daemon, real clients (smtplib, swaks), real delivery programs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import smtplib
import socket
import subprocess
import time

import pytest

from tests.conftest import free_port
from tests.ofmipd_server import CAPTURE, PROGS, Daemon, captured_messages, server_env

PASSWORD = "Corr3ct-Horse"
MESSAGE = b"Subject: hello\r\n\r\nbody line\r\n.leading dot\r\n"


@pytest.fixture
def authfile(tmp_path):
    path = tmp_path / "users"
    path.write_text(f"# users\n\nalice:{PASSWORD}\nBob:colon:in:pw\n")
    path.chmod(0o600)
    return path


def start(tmp_path, *args, env=None):
    port = free_port()
    daemon = Daemon(
        ["-p", f"127.0.0.1:{port}", "--hostname", "mx.test", *args], port, tmp_path, env=env
    )
    return daemon


@pytest.fixture
def server(tmp_path, authfile, capture):
    daemon = start(
        tmp_path,
        "-a",
        str(authfile),
        "--sendmail",
        CAPTURE,
        env=server_env(CAPTURE_DIR=str(capture)),
    )
    yield daemon
    daemon.stop()


def smtp(daemon) -> smtplib.SMTP:
    return smtplib.SMTP(daemon.host, daemon.port, local_hostname="client.test", timeout=20)


def test_banner_and_ehlo_extensions(server):
    with smtp(server) as s:
        code, ext = s.ehlo()
        assert code == 250
        text = ext.decode()
        for keyword in ("PIPELINING", "SIZE", "8BITMIME", "ENHANCEDSTATUSCODES"):
            assert keyword in text
        assert "AUTH PLAIN LOGIN CRAM-MD5" in text


def test_banner_names_host_and_ofmipd(server):
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        assert sock.recv(200) == b"220 mx.test ESMTP ofmipd\r\n"


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_each_mechanism_logs_in_and_delivers(server, capture, mechanism):
    with smtp(server) as s:
        s.ehlo()
        s.user, s.password = "alice", PASSWORD
        auth = {"PLAIN": s.auth_plain, "LOGIN": s.auth_login, "CRAM-MD5": s.auth_cram_md5}
        code, _ = s.auth(mechanism, auth[mechanism], initial_response_ok=mechanism == "PLAIN")
        assert code == 235
        s.sendmail("alice@example.org", ["rcpt@example.net"], MESSAGE)
    ((env, message),) = captured_messages(capture)
    assert "ARGV: -f alice@example.org -i -- rcpt@example.net" in env
    assert "LOGIN=alice" in env and "TCPREMOTEIP=127.0.0.1" in env
    header, _, body = message.partition(b"Subject: hello")
    assert header.startswith(b"Received: from client.test (")
    assert b"[127.0.0.1]" in header and b"authenticated user alice" in header
    assert b"by mx.test (ofmipd) with ESMTPA id " in header
    assert b".leading dot" in body and b"\n..leading" not in body


def test_user_names_match_case_insensitively_and_passwords_may_hold_colons(server):
    with smtp(server) as s:
        s.ehlo()
        assert s.login("bob", "colon:in:pw")[0] == 235


NEAR_MISSES = [
    ("alice", PASSWORD[:-1] + "X"),
    ("alice", " " + PASSWORD),
    ("alice", PASSWORD + " "),
    ("alice", PASSWORD.lower()),
    ("alice", PASSWORD + "\0"),
    ("alice", ""),
    ("alicf", PASSWORD),
    (" alice", PASSWORD),
    ("alice\0", PASSWORD),
    ("", PASSWORD),
]


@pytest.mark.parametrize("user,password", NEAR_MISSES)
def test_near_miss_credentials_get_535(server, user, password):
    blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode() or "="
    with smtp(server) as s:
        s.ehlo()
        code, reply = s.docmd("AUTH", f"PLAIN {blob}")
        assert code == 535, reply
        assert reply.startswith(b"5.7.8")


def test_mechanism_names_are_case_insensitive(server):
    blob = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
    with smtp(server) as s:
        s.ehlo()
        assert s.docmd("auth", f"plain {blob}")[0] == 235
        assert s.docmd("AUTH", f"PLAIN {blob}")[0] == 503


def test_plain_empty_challenge_form_and_cancel(server):
    with smtp(server) as s:
        s.ehlo()
        assert s.docmd("AUTH", "PLAIN") == (334, b"")
        assert s.docmd("*")[0] == 501
        assert s.docmd("AUTH", "PLAIN")[0] == 334
        blob = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
        assert s.docmd(blob)[0] == 235


def test_login_uses_conventional_challenges(server):
    with smtp(server) as s:
        s.ehlo()
        code, challenge = s.docmd("AUTH", "LOGIN")
        assert (code, base64.b64decode(challenge)) == (334, b"Username:")
        code, challenge = s.docmd(base64.b64encode(b"alice").decode())
        assert (code, base64.b64decode(challenge)) == (334, b"Password:")
        assert s.docmd(base64.b64encode(PASSWORD.encode()).decode())[0] == 235


def test_cram_md5_with_wrong_secret_is_535(server):
    with smtp(server) as s:
        s.ehlo()
        code, challenge = s.docmd("AUTH", "CRAM-MD5")
        assert code == 334
        digest = hmac.new(b"wrong", base64.b64decode(challenge), hashlib.md5).hexdigest()
        code, _ = s.docmd(base64.b64encode(f"alice {digest}".encode()).decode())
        assert code == 535


def test_bad_base64_is_501(server):
    with smtp(server) as s:
        s.ehlo()
        code, reply = s.docmd("AUTH", "PLAIN !!notbase64")
        assert (code, reply[:5]) == (501, b"5.5.2")


def test_mail_before_auth_is_530(server, capture):
    with smtp(server) as s:
        s.ehlo()
        code, reply = s.docmd("MAIL", "FROM:<alice@example.org>")
        assert (code, reply[:5]) == (530, b"5.7.0")
    assert captured_messages(capture) == []


def test_unknown_mechanism_is_504(server):
    with smtp(server) as s:
        s.ehlo()
        assert s.docmd("AUTH", "GSSAPI")[0] == 504


def test_swaks_submits_with_auth_login(server, capture):
    for auth in ("LOGIN", "PLAIN", "CRAM-MD5"):
        result = subprocess.run(
            [
                "swaks",
                "--server",
                f"{server.host}:{server.port}",
                "--auth",
                auth,
                "--auth-user",
                "alice",
                "--auth-password",
                PASSWORD,
                "--from",
                "alice@example.org",
                "--to",
                "someone@example.net",
                "--helo",
                "swaks.test",
                "--body",
                "via swaks",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "235 2.7.0" in result.stdout
    assert len(captured_messages(capture)) == 3


@pytest.mark.slow
def test_password_never_in_log_even_in_debug(tmp_path, authfile, capture):
    daemon = start(
        tmp_path,
        "-d",
        "-a",
        str(authfile),
        "--sendmail",
        CAPTURE,
        env=server_env(CAPTURE_DIR=str(capture)),
    )
    try:
        blob = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
        wrong = base64.b64encode(b"\0alice\0WrongPassw0rd").decode()
        with smtp(daemon) as s:
            s.ehlo()
            s.docmd("AUTH", f"PLAIN {wrong}")
            s.docmd("AUTH", "LOGIN")
            s.docmd(base64.b64encode(b"alice").decode())
            s.docmd(base64.b64encode(PASSWORD.encode()).decode())
            s.docmd("AUTH", f"PLAIN {blob}")
        time.sleep(0.3)
        log = daemon.log_text()
    finally:
        daemon.stop()
    assert "auth reject" in log and "auth accept" in log  # the log is really written
    for secret in (
        PASSWORD,
        blob,
        wrong,
        "WrongPassw0rd",
        base64.b64encode(PASSWORD.encode()).decode(),
    ):
        assert secret not in log


def session(daemon, lines: list[str]) -> None:
    """One session of raw command lines, each reply read before the next line is sent."""
    with socket.create_connection((daemon.host, daemon.port), timeout=20) as sock:
        stream = sock.makefile("rwb")
        stream.readline()  # banner
        for line in [*lines, "QUIT"]:
            stream.write(line.encode() + b"\r\n")
            stream.flush()
            while True:  # through the last line of the reply
                reply = stream.readline()
                assert reply, f"connection closed after {line!r}"
                if reply[3:4] != b"-":
                    break


def test_debug_trace_shows_no_auth_payload_even_in_malformed_or_stray_lines(
    tmp_path, authfile, capture
):
    secrets = [f"Secret-{n}-Pass" for n in range(9)]
    secrets[6] = PASSWORD  # this one logs in
    payloads = [base64.b64encode(f"\0alice\0{secret}".encode()).decode() for secret in secrets]
    daemon = start(tmp_path, "-d", "-a", str(authfile), "--sendmail", CAPTURE,
                   env=server_env(CAPTURE_DIR=str(capture)))  # fmt: skip
    try:
        # Two sessions: aiosmtpd closes one after five unrecognised commands.
        session(daemon, [
            # AUTH LOGIN refused before EHLO: a client that does not wait for 334 sends
            # its user and password lines anyway, and they reach the command loop.
            "AUTH LOGIN", payloads[0], payloads[1],
            "EHLO client.test",
            f"AUTH PLAIN={payloads[2]}",
            f"XAUTH PLAIN {payloads[3]}",
            f"auth\tplain {payloads[4]}",
        ])  # fmt: skip
        session(daemon, [
            "EHLO client.test",
            f"   auth plain {payloads[5]}",
            f"auth plain {payloads[6]}",  # lowercase, well-formed: accepted
            "RSET",
            payloads[7],  # a stray base64 line after the exchange
            f"MAIL FROM:<a@example.org> AUTH={payloads[8]}",  # not an AUTH command
        ])  # fmt: skip
        time.sleep(0.3)
        log = daemon.log_text()
    finally:
        daemon.stop()
    assert "auth accept: client=127.0.0.1 user=alice" in log
    assert "EHLO client.test" in log  # the trace is really there
    for n, (secret, payload) in enumerate(zip(secrets[:8], payloads[:8], strict=True)):
        for shown in (payload, payload.upper(), secret, secret.upper()):
            assert shown not in log, (n, shown)
    assert ">> auth\\x09plain <redacted>" in log and ">> XAUTH PLAIN <redacted>" in log
    for line in log.splitlines():
        assert line.isprintable(), line


def test_maildir_delivery(tmp_path, authfile):
    maildir = tmp_path / "Maildir"
    daemon = start(tmp_path, "-a", str(authfile), "--maildir", str(maildir))
    try:
        with smtp(daemon) as s:
            s.login("alice", PASSWORD)
            s.sendmail("alice@example.org", ["x@example.net"], MESSAGE)
    finally:
        daemon.stop()
    files = list((maildir / "new").iterdir())
    assert len(files) == 1
    content = files[0].read_bytes()
    assert content.startswith(b"Received: from client.test")
    assert b"\r\n" not in content and b"body line\n" in content
    assert list((maildir / "tmp").iterdir()) == []


def test_injector_temporary_failure_gives_451_and_nothing_delivered(tmp_path, authfile, capture):
    daemon = start(
        tmp_path,
        "-a",
        str(authfile),
        "--sendmail",
        CAPTURE,
        env=server_env(CAPTURE_DIR=str(capture), CAPTURE_EXIT="75"),
    )
    try:
        with smtp(daemon) as s:
            s.login("alice", PASSWORD)
            with pytest.raises(smtplib.SMTPDataError) as refused:
                s.sendmail("alice@example.org", ["x@example.net"], MESSAGE)
            assert refused.value.smtp_code == 451
    finally:
        daemon.stop()
    assert captured_messages(capture) == []


def test_throttle_script_refusal_is_450(tmp_path, authfile, capture):
    daemon = start(
        tmp_path,
        "-a",
        str(authfile),
        "--sendmail",
        CAPTURE,
        "-t",
        str(PROGS / "throttle"),
        env=server_env(CAPTURE_DIR=str(capture), THROTTLE_DENY="alice"),
    )
    try:
        with smtp(daemon) as s:
            s.login("alice", PASSWORD)
            with pytest.raises(smtplib.SMTPDataError) as refused:
                s.sendmail("alice@example.org", ["x@example.net"], MESSAGE)
            assert refused.value.smtp_code == 450
        with smtp(daemon) as s:
            s.login("bob", "colon:in:pw")
            s.sendmail("bob@example.org", ["x@example.net"], MESSAGE)
    finally:
        daemon.stop()
    assert len(captured_messages(capture)) == 1


def test_sigterm_exits_zero(server):
    assert server.stop() == 0


def test_connection_limit_makes_clients_wait_not_fail(tmp_path, authfile, capture):
    daemon = start(
        tmp_path,
        "-C",
        "1",
        "-a",
        str(authfile),
        "--sendmail",
        CAPTURE,
        env=server_env(CAPTURE_DIR=str(capture)),
    )
    try:
        first = smtp(daemon)
        second = socket.create_connection((daemon.host, daemon.port), timeout=10)
        second.settimeout(0.5)
        with pytest.raises(socket.timeout):
            second.recv(100)  # waits: no banner while the only slot is taken
        first.quit()
        second.settimeout(10)
        assert second.recv(100).startswith(b"220 ")
        second.close()
    finally:
        daemon.stop()


def test_ipv6_listener(tmp_path, authfile, capture):
    port = free_port("::1")
    daemon = Daemon(
        ["-6", f"[::1]:{port}", "-a", str(authfile), "--sendmail", CAPTURE],
        port,
        tmp_path,
        host="::1",
        env=server_env(CAPTURE_DIR=str(capture)),
    )
    try:
        with smtplib.SMTP("::1", port, timeout=10) as s:
            assert s.login("alice", PASSWORD)[0] == 235
    finally:
        daemon.stop()


def test_env_var_names_the_default_injector(tmp_path, authfile, capture):
    daemon = start(
        tmp_path,
        "-a",
        str(authfile),
        env=server_env(CAPTURE_DIR=str(capture), TMDA_SENDMAIL_PROGRAM=CAPTURE),
    )
    try:
        with smtp(daemon) as s:
            s.login("alice", PASSWORD)
            s.sendmail("alice@example.org", ["x@example.net"], MESSAGE)
    finally:
        daemon.stop()
    assert len(captured_messages(capture)) == 1
    assert os.environ.get("TMDA_SENDMAIL_PROGRAM") is None
