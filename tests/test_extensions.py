"""What EHLO advertises is true of the server: PIPELINING (real swaks and msmtp
pipeline their commands and deliver), SIZE, 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES."""

from __future__ import annotations

import smtplib
import socket
import subprocess
from pathlib import Path

import pytest

from tests.ofmipd_server import authfile, captured_messages, start_daemon

PASSWORD = "Extensions-4"
ADVERTISED = ("PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES")


@pytest.fixture
def users(tmp_path: Path) -> Path:
    return authfile(tmp_path, f"frank:{PASSWORD}\n")


@pytest.fixture
def server(tmp_path: Path, users: Path, capture: Path):
    with start_daemon(
        tmp_path, users, capture, "--size-limit", "100000", "--no-add-message-id", "--no-add-date"
    ) as daemon:
        yield daemon


def test_ehlo_advertises_each_extension(server) -> None:
    with smtplib.SMTP(server.host, server.port, timeout=20) as client:
        client.ehlo("c.test")
        for keyword in ADVERTISED:
            assert client.has_extn(keyword), keyword
        assert client.esmtp_features["size"] == "100000"
        client.login("frank", PASSWORD)
        # SIZE is enforced at MAIL: the declared size over the limit is refused there.
        assert client.docmd("MAIL", "FROM:<frank@example.org> SIZE=100001")[0] == 552
        code, text = client.docmd("MAIL", "FROM:<frank@example.org> SIZE=99999")
        assert (code, text[:6]) == (250, b"2.1.0 ")  # ENHANCEDSTATUSCODES


def test_smtputf8_addresses_reach_delivery(server, capture: Path) -> None:
    body = "Subject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\n\r\nGrüße, ✓\r\n".encode()
    with smtplib.SMTP(server.host, server.port, timeout=20) as client:
        client.login("frank", PASSWORD)
        client.sendmail(
            "frank@exämple.org", ["jörg@例え.jp"], body, mail_options=["SMTPUTF8", "BODY=8BITMIME"]
        )
    ((env, message),) = captured_messages(capture)
    assert "ARGV: -f frank@exämple.org -i -- jörg@例え.jp" in env
    assert message.endswith(body)


def test_8bitmime_body_is_passed_byte_for_byte(server, capture: Path) -> None:
    body = b"Subject: 8bit\r\nContent-Type: text/plain; charset=latin-1\r\n\r\ncaf\xe9\r\n"
    with smtplib.SMTP(server.host, server.port, timeout=20) as client:
        client.login("frank", PASSWORD)
        client.sendmail("frank@example.org", ["to@example.net"], body, ["BODY=8BITMIME"])
    ((_, message),) = captured_messages(capture)
    assert message.endswith(body)


def test_address_that_is_not_utf8_is_refused(server) -> None:
    with socket.create_connection((server.host, server.port), timeout=20) as sock:
        stream = sock.makefile("rwb")
        stream.readline()
        blob = __import__("base64").b64encode(f"\0frank\0{PASSWORD}".encode())
        stream.write(b"EHLO c.test\r\nAUTH PLAIN " + blob + b"\r\n")
        stream.write(b"MAIL FROM:<fr\xffnk@example.org> SMTPUTF8\r\nQUIT\r\n")
        stream.flush()
        replies = stream.read().split(b"\r\n")
    assert any(line.startswith(b"553 5.1.3") for line in replies), replies


def test_echoed_argument_that_is_not_utf8_gets_a_question_mark(server) -> None:
    # aiosmtpd echoes VRFY's argument; its surrogates once ended the session in a traceback.
    with socket.create_connection((server.host, server.port), timeout=20) as sock:
        sock.sendall(b"EHLO c.test\r\nVRFY \xff\r\nQUIT\r\n")
        replies = sock.makefile("rb").read().split(b"\r\n")
    assert b"502 5.5.1 Could not VRFY ?" in replies and b"221 2.0.0 Bye" in replies
    assert "Traceback" not in server.log_text()


def test_swaks_pipelines_and_delivers(server, capture: Path) -> None:
    done = subprocess.run(
        ["swaks", "--server", f"{server.host}:{server.port}", "--pipeline", "--helo", "c.test",
         "--auth", "PLAIN", "--auth-user", "frank", "--auth-password", PASSWORD,
         "--from", "frank@example.org", "--to", "a@example.net,b@example.net",
         "--header", "Subject: piped", "--timeout", "30"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    transcript = done.stdout
    assert done.returncode == 0, transcript + done.stderr
    # swaks sent MAIL, both RCPTs and DATA before reading a reply, and got each one right.
    sent = transcript.index(" -> MAIL FROM:<frank@example.org>")
    data = transcript.index(" -> DATA", sent)
    assert transcript.count(" -> RCPT TO:", sent, data) == 2
    assert "<- " not in transcript[sent:data]
    assert transcript.count("<-  250 2.1.5 Recipient OK") == 2
    ((env, message),) = captured_messages(capture)
    assert "-- a@example.net b@example.net" in env and b"Subject: piped" in message


def test_msmtp_pipelines_and_delivers(tmp_path: Path, server, capture: Path) -> None:
    rc = tmp_path / "msmtprc"
    rc.write_text(
        f"account test\nhost {server.host}\nport {server.port}\ndomain c.test\n"
        f"from frank@example.org\ntls off\nauth plain\nuser frank\npassword {PASSWORD}\n"
        "account default : test\n"
    )
    rc.chmod(0o600)
    done = subprocess.run(
        ["msmtp", "-C", str(rc), "-d", "a@example.net", "b@example.net"],
        input="Subject: via msmtp\n\nhello\n", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    debug = done.stdout + done.stderr
    assert done.returncode == 0, debug
    sent = debug.index("--> MAIL FROM:<frank@example.org>")
    first_reply = debug.index("<-- 250", sent)
    assert debug.count("--> RCPT TO:", sent, first_reply) == 2  # pipelined
    ((env, message),) = captured_messages(capture)
    assert "-- a@example.net b@example.net" in env and message.endswith(b"\r\nhello\r\n")
