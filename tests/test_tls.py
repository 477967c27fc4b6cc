"""STARTTLS and implicit TLS with real TLS handshakes (smtplib, swaks)."""

from __future__ import annotations

import base64
import signal
import smtplib
import socket
import ssl
import subprocess
import time

import pytest

from tests.ofmipd_server import captured_messages, server_env, start_daemon
from tests.tls_support import client_context, make_certificate

PASSWORD = "Tls-Pass-77"


@pytest.fixture
def users(tmp_path):
    path = tmp_path / "users"
    path.write_text(f"frank:{PASSWORD}\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def cert(tmp_path):
    return make_certificate(tmp_path)


def cert_args(cert) -> list[str]:
    return ["--ssl-cert", str(cert[0]), "--ssl-key", str(cert[1])]


daemon = start_daemon


def test_tls_on_hides_auth_and_refuses_mail_until_starttls(tmp_path, users, cert, capture):
    with daemon(
        tmp_path,
        users,
        capture,
        "--tls",
        "on",
        *cert_args(cert),
    ) as server:
        with smtplib.SMTP(server.host, server.port, timeout=20) as s:
            s.ehlo("c.test")
            assert s.has_extn("starttls") and not s.has_extn("auth")
            blob = base64.b64encode(f"\0frank\0{PASSWORD}".encode()).decode()
            assert s.docmd("AUTH", f"PLAIN {blob}") == (
                530,
                b"5.7.0 Must issue a STARTTLS command first",
            )
            assert s.docmd("MAIL", "FROM:<frank@example.org>")[0] == 530
            s.starttls(context=client_context(cert[0]))
            s.ehlo("c.test")
            assert s.has_extn("auth") and not s.has_extn("starttls")
            assert s.docmd("STARTTLS")[0] == 503
            assert s.login("frank", PASSWORD)[0] == 235
            s.sendmail("frank@example.org", ["x@example.net"], b"Subject: t\r\n\r\nhi\r\n")
    ((_, message),) = captured_messages(capture)
    assert b"with ESMTPSA id" in message


def test_localoptional_allows_auth_in_clear_from_loopback_only(tmp_path, users, cert, capture):
    with daemon(
        tmp_path,
        users,
        capture,
        "--tls",
        "localoptional",
        *cert_args(cert),
    ) as server:
        with smtplib.SMTP(server.host, server.port, timeout=20) as s:
            s.ehlo("c.test")
            assert s.has_extn("auth") and s.has_extn("starttls")
            assert s.login("frank", PASSWORD)[0] == 235


def test_implicit_tls_offers_auth_and_no_starttls(tmp_path, users, cert, capture):
    with daemon(
        tmp_path,
        users,
        capture,
        "--ssl",
        *cert_args(cert),
    ) as server:
        with smtplib.SMTP_SSL(
            server.host, server.port, timeout=20, context=client_context(cert[0])
        ) as s:
            s.ehlo("c.test")
            assert s.has_extn("auth") and not s.has_extn("starttls")
            assert s.docmd("STARTTLS")[0] == 503
            assert s.login("frank", PASSWORD)[0] == 235
            s.sendmail("frank@example.org", ["x@example.net"], b"Subject: t\r\n\r\nhi\r\n")
        result = subprocess.run(
            [
                "swaks",
                "--server",
                f"{server.host}:{server.port}",
                "--tlsc",
                "--auth",
                "PLAIN",
                "--auth-user",
                "frank",
                "--auth-password",
                PASSWORD,
                "--to",
                "y@example.net",
                "--from",
                "frank@example.org",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout
    assert len(captured_messages(capture)) == 2


@pytest.mark.slow
def test_commands_pipelined_after_starttls_are_discarded(tmp_path, users, cert, capture):
    with daemon(
        tmp_path,
        users,
        capture,
        "--tls",
        "optional",
        *cert_args(cert),
    ) as server:
        raw = socket.create_connection((server.host, server.port), timeout=20)
        reader = raw.makefile("rb")
        reader.readline()
        raw.sendall(b"EHLO c.test\r\n")
        while not reader.readline().startswith(b"250 "):
            pass
        # The injected MAIL must not survive into the TLS session (CVE-2011-0411 class).
        raw.sendall(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
        assert reader.readline().startswith(b"220")
        tls = client_context(cert[0]).wrap_socket(raw, server_hostname="mx.test")
        tls_reader = tls.makefile("rb")
        tls.sendall(b"EHLO c.test\r\n")
        lines = []
        while True:
            line = tls_reader.readline()
            lines.append(line)
            if line.startswith(b"250 "):
                break
        assert all(not line.startswith(b"530") for line in lines)
        tls.sendall(b"RCPT TO:<x@example.net>\r\n")
        assert tls_reader.readline().startswith(b"503")  # no MAIL was carried over
        tls.sendall(b"QUIT\r\n")
        tls.close()


def test_auth_before_starttls_is_forgotten_after_it(tmp_path, users, cert, capture):
    with daemon(
        tmp_path,
        users,
        capture,
        "--tls",
        "optional",
        *cert_args(cert),
    ) as server:
        with smtplib.SMTP(server.host, server.port, timeout=20) as s:
            s.ehlo("c.test")
            assert s.login("frank", PASSWORD)[0] == 235
            s.starttls(context=client_context(cert[0]))
            s.ehlo("c.test")
            assert s.docmd("MAIL", "FROM:<frank@example.org>")[0] == 530


def test_sighup_reloads_the_certificate_without_dropping_sessions(tmp_path, users, capture):
    live = tmp_path / "live"
    live.mkdir()
    first = make_certificate(tmp_path, "first.test")
    second = make_certificate(tmp_path, "second.test")
    cert, key = live / "cert.pem", live / "key.pem"
    cert.write_bytes(first[0].read_bytes())
    key.write_bytes(first[1].read_bytes())
    server = daemon(
        tmp_path, users, capture, "--ssl", "--ssl-cert", str(cert), "--ssl-key", str(key)
    )

    def peer_name() -> str:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with socket.create_connection((server.host, server.port), timeout=20) as raw:
            with context.wrap_socket(raw) as tls:
                der = tls.getpeercert(binary_form=True)
        return ssl.DER_cert_to_PEM_cert(der)

    try:
        before = peer_name()
        open_session = smtplib.SMTP_SSL(
            server.host, server.port, timeout=20, context=client_context(first[0])
        )
        open_session.ehlo("c.test")
        cert.write_bytes(second[0].read_bytes())
        key.write_bytes(second[1].read_bytes())
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while peer_name() == before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert peer_name() != before
        assert open_session.login("frank", PASSWORD)[0] == 235  # the old session lives on
        open_session.quit()
    finally:
        server.stop()
    assert "configuration reloaded" in server.log_text()


def test_missing_certificate_is_a_one_line_error(tmp_path, users):
    result = subprocess.run(
        [
            *__import__("tests.ofmipd_server", fromlist=["x"]).ofmipd_command(
                "-1", "-a", str(users), "--tls", "on", "--ssl-cert", str(tmp_path / "none.pem")
            )
        ],
        capture_output=True,
        env=server_env(),
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.decode().count("\n") == 1 and "none.pem" in result.stderr.decode()
