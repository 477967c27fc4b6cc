"""RFC 8314 §4.3: the Received header records the TLS protocol and cipher, in Postfix's
form, when the session used TLS (STARTTLS or implicit), and nothing when it did not."""

from __future__ import annotations

import re
import smtplib
import ssl
from pathlib import Path

import pytest

from ofmipd.delivery import received_header, tls_clause
from ofmipd.identity import ClientIdentity
from tests.ofmipd_server import authfile, captured_messages, start_daemon
from tests.tls_support import client_context, make_certificate

PASSWORD = "Received-Tls-9"
MESSAGE = b"Subject: t\r\n\r\nhi\r\n"


@pytest.fixture
def users(tmp_path: Path) -> Path:
    return authfile(tmp_path, f"frank:{PASSWORD}\n")


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    return make_certificate(tmp_path)


def expected(client_ssl: ssl.SSLSocket, alg_bits: int) -> bytes:
    name, _, bits = client_ssl.cipher() or ("?", "?", 0)
    return (
        f"\t(using {client_ssl.version()} with cipher {name} ({bits}/{alg_bits} bits))\r\n".encode()
    )


def received(message: bytes) -> bytes:
    match = re.match(rb"Received: .*?;\r\n\t[^\r]+\r\n", message, re.S)
    assert match, message[:300]
    return match.group(0)


def test_starttls_session_records_protocol_and_cipher(
    tmp_path: Path, users: Path, cert: tuple[Path, Path], capture: Path
) -> None:
    tls = ("--tls", "optional", "--ssl-cert", str(cert[0]), "--ssl-key", str(cert[1]))
    with start_daemon(tmp_path, users, capture, *tls) as server:
        with smtplib.SMTP(server.host, server.port, timeout=20) as client:
            client.starttls(context=client_context(cert[0]))
            client.login("frank", PASSWORD)
            client.sendmail("frank@example.org", ["to@example.net"], MESSAGE)
            sock = client.sock
            assert isinstance(sock, ssl.SSLSocket)
            line = expected(sock, 256)
        with smtplib.SMTP(server.host, server.port, timeout=20) as client:
            client.login("frank", PASSWORD)  # --tls optional: in the clear from loopback
            client.sendmail("frank@example.org", ["to@example.net"], MESSAGE)
    (_, with_tls), (_, plain) = captured_messages(capture)
    header = received(with_tls)
    # Python's default TLS 1.3 cipher with this client; Postfix's exact wording.
    assert b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n" in header
    assert line in header and b"with ESMTPSA id" in header
    assert header.index(b"(using") < header.index(b"(authenticated user frank)")
    assert b"(using" not in received(plain) and b"with ESMTPA id" in received(plain)


def test_implicit_tls_session_records_tls12_cipher(
    tmp_path: Path, users: Path, cert: tuple[Path, Path], capture: Path
) -> None:
    tls = ("--ssl", "--ssl-cert", str(cert[0]), "--ssl-key", str(cert[1]))
    context = client_context(cert[0])
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
    with start_daemon(tmp_path, users, capture, *tls) as server:
        with smtplib.SMTP_SSL(server.host, server.port, timeout=20, context=context) as client:
            client.login("frank", PASSWORD)
            client.sendmail("frank@example.org", ["to@example.net"], MESSAGE)
    ((_, message),) = captured_messages(capture)
    line = b"\t(using TLSv1.2 with cipher ECDHE-ECDSA-AES128-GCM-SHA256 (128/128 bits))\r\n"
    assert line in received(message)


class FakeSSL:
    """What tls_clause reads of an SSL object, with a cipher name that tries to forge."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.context = ssl.create_default_context()

    def cipher(self) -> tuple[str, str, int]:
        return (self.name, "TLSv1.3", 256)

    def version(self) -> str:
        return "TLSv1.3"


def test_clause_is_header_safe_and_absent_without_tls() -> None:
    assert tls_clause(None) is None
    clause = tls_clause(FakeSSL("X)\r\nReceived: (forged"))  # type: ignore[arg-type]
    assert clause is not None and "\r" not in clause and ")" not in clause.split(" (")[0]
    header = received_header(
        helo="c", client=ClientIdentity(ip="192.0.2.1"), reverse_name=None, hostname="mx.test",
        protocol="ESMTPSA", queue_id="Q", user=None, tls=clause, now=0.0,
    )  # fmt: skip
    lines = header.split(b"\r\n")[1:-1]  # one header: every later line is a continuation
    assert len(lines) == 3 and all(line.startswith(b"\t") for line in lines)
