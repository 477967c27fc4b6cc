"""conf/systemd/ofmipd-submission.service (--tls on, port 587 style) and
ofmipd-smtps.service (--ssl, port 465 style): their ExecStart lines on free ports."""

from __future__ import annotations

import base64
import signal
import smtplib
import socket
import time
from pathlib import Path

from tests.conftest import free_port
from tests.deploy_support import (
    PASSWORD,
    USER,
    USERS_PATH,
    Launched,
    Workspace,
    exec_start,
    make_certificate,
    msmtp,
    received,
    wait_for_banner,
)


def start_unit(work: Workspace, unit: str, port: int) -> tuple[Launched, Path]:
    cert, key, _ = make_certificate(work.root)
    listen = "465" if "smtps" in unit else "587"
    argv = exec_start(
        f"systemd/{unit}",
        work.replacements(
            **{
                f"-p 0.0.0.0:{listen}": f"-p 127.0.0.1:{port}",
                f"-6 [::]:{listen}": f"-6 [::1]:{free_port('::1')}",
                "/etc/ssl/certs/mail.pem": str(cert),
                "/etc/ssl/private/mail.key": str(key),
                USERS_PATH: str(work.users),
                " -u ofmipd": "",  # the tests run as root and have no user ofmipd
            }
        ),
    )
    launched = work.start(argv, unit)
    wait_for_banner("127.0.0.1", port, launched)
    return launched, cert


def test_submission_starttls_then_auth(work: Workspace) -> None:
    port = free_port()
    launched, cert = start_unit(work, "ofmipd-submission.service", port)
    sent = msmtp(work.root, port, source_ip="127.0.0.5", tls="starttls", trust=cert)
    assert sent.returncode == 0, sent.stdout + sent.stderr + launched.log()
    (message,) = work.messages()
    header = received(message)
    assert "[127.0.0.5]" in header and "with ESMTPSA" in header, header


def test_submission_refuses_auth_and_mail_before_starttls(work: Workspace) -> None:
    port = free_port()
    start_unit(work, "ofmipd-submission.service", port)
    with smtplib.SMTP("127.0.0.1", port, local_hostname="mua.test", timeout=30) as client:
        code, _ = client.ehlo()
        assert code == 250
        assert client.has_extn("starttls") and not client.has_extn("auth")
        plain = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
        code, text = client.docmd("AUTH", f"PLAIN {plain}")
        assert code == 530 and b"STARTTLS" in text, text
        code, _ = client.docmd("MAIL", "FROM:<alice@example.org>")
        assert code == 530
        client.starttls()
        client.ehlo()
        assert client.has_extn("auth")  # offered once the channel is encrypted
    assert work.messages() == []


def test_smtps_implicit_tls(work: Workspace) -> None:
    port = free_port()
    launched, cert = start_unit(work, "ofmipd-smtps.service", port)
    sent = msmtp(work.root, port, source_ip="127.0.0.5", tls="implicit", trust=cert)
    assert sent.returncode == 0, sent.stdout + sent.stderr + launched.log()
    (message,) = work.messages()
    header = received(message)
    assert "[127.0.0.5]" in header and "with ESMTPSA" in header, header
    # nothing in clear: a plaintext client gets no banner
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"EHLO plain.test\r\n")
        assert not sock.recv(100).startswith(b"220")


def test_smtps_daemon_stops_promptly_after_a_session(work: Workspace) -> None:
    port = free_port()
    launched, cert = start_unit(work, "ofmipd-smtps.service", port)
    sent = msmtp(work.root, port, tls="implicit", trust=cert)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    time.sleep(0.5)  # the session has ended; nothing is in progress
    launched.proc.send_signal(signal.SIGTERM)
    assert launched.proc.wait(8) == 0
