"""MAIL FROM and RCPT TO with hostile arguments: a 5xx reply with an enhanced code, never
the exception handler; and an exception in a handler ends the transaction it was in."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import smtplib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ofmipd import cli, connection
from ofmipd.assemble import build_app
from ofmipd.smtp import SubmissionProtocol
from tests.conftest import free_port
from tests.ofmipd_server import CAPTURE, Daemon, captured_messages, server_env

EXAMPLES = int(os.environ.get("OFMIPD_FUZZ_EXAMPLES", "300"))
PASSWORD = "Envelope-Pw-7"
AUTH = b"AUTH PLAIN " + base64.b64encode(b"\0erin\0" + PASSWORD.encode())
# A reply line: code, then an enhanced status code (RFC 2034), then printable text.
ENHANCED = re.compile(rb"^[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3}( [\x20-\x7e]*)?$")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory) -> Iterator[Daemon]:
    work = tmp_path_factory.mktemp("envelope")
    users = work / "users"
    users.write_text(f"erin:{PASSWORD}\n")
    users.chmod(0o600)
    capture = work / "capture"
    capture.mkdir()
    port = free_port()
    server = Daemon(
        ["-p", f"127.0.0.1:{port}", "--hostname", "mx.test", "-a", str(users),
         "--sendmail", CAPTURE, "--max-errors", "1000", "--max-per-ip", "50"],
        port, work, env=server_env(CAPTURE_DIR=str(capture)),
    )  # fmt: skip
    try:
        yield server
    finally:
        server.stop()


def converse(daemon: Daemon, *commands: bytes) -> list[bytes]:
    """EHLO and AUTH, then the commands pipelined, then QUIT: every reply line after AUTH."""
    with socket.create_connection((daemon.host, daemon.port), timeout=20) as sock:
        sock.sendall(b"".join(c + b"\r\n" for c in (b"EHLO client.test", AUTH, *commands)))
        sock.sendall(b"QUIT\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    lines = data.split(b"\r\n")
    assert lines.pop() == b"", "the reply stream ends in the middle of a line"
    start = next(i for i, line in enumerate(lines) if line.startswith(b"235 "))
    return lines[start + 1 :]


def no_exception_logged(daemon: Daemon) -> None:
    log = daemon.log_text()
    assert "Traceback" not in log and "session error" not in log, log[-3000:]


CONTROLS = ["\x00", "\x01", "\r", "\x1b", "\x7f"]  # a tab is whitespace to the parser


@pytest.mark.parametrize("control", CONTROLS, ids=[f"{ord(c):02x}" for c in CONTROLS])
@pytest.mark.parametrize("where", ["sender", "recipient"])
def test_control_characters_in_an_address_get_553_and_the_session_goes_on(
    daemon: Daemon, where: str, control: str
) -> None:
    bad = f"<od{control}d@example.org>".encode()
    quoted = f'<"od{control}d"@example.org>'.encode()
    literal = f"<odd@[{control}]>".encode()
    if where == "sender":
        commands = [b"MAIL FROM:" + bad, b"MAIL FROM:" + quoted, b"MAIL FROM:" + literal]
        commands += [b"MAIL FROM:<erin@example.org>", b"RCPT TO:<ok@example.net>"]
    else:
        commands = [b"MAIL FROM:<erin@example.org>"]
        commands += [b"RCPT TO:" + bad, b"RCPT TO:" + quoted, b"RCPT TO:" + literal]
        commands += [b"RCPT TO:<ok@example.net>"]
    replies = converse(daemon, *commands, b"RSET")
    codes = [line[:9] for line in replies]
    if where == "sender":
        assert codes[:5] == [b"553 5.1.3"] * 3 + [b"250 2.1.0", b"250 2.1.5"], replies
    else:
        assert codes[:5] == [b"250 2.1.0"] + [b"553 5.1.3"] * 3 + [b"250 2.1.5"], replies
    no_exception_logged(daemon)


def test_a_nul_in_a_recipient_never_reaches_the_injector(daemon: Daemon) -> None:
    # Before: 250 to RCPT, then 451 and a traceback when the injector's argv held the NUL,
    # and the half-built envelope made the next MAIL a "503 nested MAIL command".
    replies = converse(
        daemon,
        b"MAIL FROM:<erin@example.org>",
        b"RCPT TO:<x\x00y@example.net>",
        b"RCPT TO:<ok@example.net>",
        b"DATA",
        b"Subject: nul\r\n\r\nbody\r\n.",
        b"MAIL FROM:<erin@example.org>",
        b"RSET",
    )
    assert [line[:3] for line in replies[:6]] == [b"250", b"553", b"250", b"354", b"250", b"250"]
    no_exception_logged(daemon)


@pytest.mark.parametrize(
    "path",
    [b"<" + b"a" * 65 + b"@example.org>", b'<"x>', b'<"x@example.org>'],
    ids=["local-part-65", "unterminated-quote", "unterminated-quote-at"],
)
def test_an_overlong_or_unterminated_local_part_gets_553(daemon: Daemon, path: bytes) -> None:
    # RFC 5321 4.5.3.1.1: a local part is at most 64 octets. '<"x>' used to get 250 as the
    # address '"x>"', the parser closing the quote the client never did.
    replies = converse(
        daemon,
        b"MAIL FROM:" + path,
        b"MAIL FROM:<" + b"a" * 64 + b"@example.org>",
        b"RCPT TO:" + path,
        b"RCPT TO:<ok@example.net>",
        b"RSET",
    )
    assert [line[:9] for line in replies[:4]] == [
        b"553 5.1.3",
        b"250 2.1.0",
        b"553 5.1.3",
        b"250 2.1.5",
    ], replies
    no_exception_logged(daemon)


# ---- any MAIL / RCPT argument, with ESMTP parameters ------------------------------------

_CHARS = st.sampled_from(list(b'\x00\x01\t\r\x0b\x0c\x1b\x7f "\\<>@[]().,:;=a9-+'))
_text = st.lists(_CHARS, max_size=10).map(bytes)
_param = st.one_of(
    st.builds(lambda v: b"SIZE=" + v, st.one_of(_text, st.sampled_from([b"9" * 400, b"-1"]))),
    st.builds(lambda v: b"BODY=" + v, st.one_of(_text, st.just(b"8BITMIME"))),
    st.builds(lambda k, v: k + b"=" + v, _text, _text),
    st.sampled_from([b"SMTPUTF8", b"SMTPUTF8=\x00", b"AUTH=<>", b"RET=HDRS", b"NOTIFY=NEVER"]),
)
_path = st.one_of(
    _text,
    st.builds(lambda local, domain: b"<" + local + b"@" + domain + b">", _text, _text),
    st.builds(lambda local: b'<"' + local + b'"@example.org>', _text),
    st.sampled_from([b"<>", b"<erin@example.org>", b"<@a,@b:c@d>"]),
)
_argument = st.builds(
    lambda path, params: path + b"".join(b" " + p for p in params),
    _path,
    st.lists(_param, max_size=3),
)


@pytest.mark.slow
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sender=_argument, recipient=_argument)
def test_any_mail_and_rcpt_argument_gets_a_5xx_or_250_never_an_internal_error(
    daemon: Daemon, sender: bytes, recipient: bytes
) -> None:
    replies = converse(
        daemon,
        b"MAIL FROM:" + sender,
        b"RCPT TO:" + recipient,
        b"DATA",  # if both were accepted, delivery sees them
        b"x",
        b".",
        b"RSET",
        b"MAIL FROM:<erin@example.org>",
        b"RCPT TO:<ok@example.net>",
        b"DATA",
        b"Subject: after\r\n\r\nbody\r\n.",
    )
    for line in replies:
        assert ENHANCED.match(line) or line.startswith(b"354 "), replies
        assert not line.startswith(b"451"), replies
    mail, rcpt, *_ = (line[:3] for line in replies)
    assert mail in (b"250", b"500", b"501", b"552", b"553", b"555"), replies
    assert rcpt in (b"250", b"500", b"501", b"503", b"553", b"555"), replies
    # The transaction after RSET is untouched by whatever came before.
    assert [line[:3] for line in replies[-6:]] == [b"250", b"250", b"250", b"354", b"250", b"221"]
    no_exception_logged(daemon)


# ---- an exception in a handler ----------------------------------------------------------


def test_an_exception_in_a_handler_resets_the_transaction(
    tmp_path: Path, capture: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No client input raises in a handler any more, so the fault is injected: the first
    # delivery raises, as an unforeseen bug would.
    monkeypatch.setenv("CAPTURE_DIR", str(capture))
    users = tmp_path / "users"
    users.write_text(f"erin:{PASSWORD}\n")
    users.chmod(0o600)
    args = cli.build_parser().parse_args(
        ["-a", str(users), "--sendmail", CAPTURE, "--hostname", "mx.test", "--no-reverse-dns"]
    )
    app = build_app(cli.config_from_args(args))
    deliver = app.delivery.deliver
    calls = []

    async def fails_once(submission):  # type: ignore[no-untyped-def]
        calls.append(submission.recipients)
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        return await deliver(submission)

    app.delivery.deliver = fails_once  # type: ignore[method-assign]

    def client(port: int) -> list[tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
            smtp.ehlo("client.test")
            smtp.login("erin", PASSWORD)
            got = [smtp.mail("erin@example.org"), smtp.rcpt("first@example.net")]
            got.append(smtp.data(b"Subject: one\r\n\r\nbody\r\n"))
            got += [smtp.mail("erin@example.org"), smtp.rcpt("second@example.net")]
            got.append(smtp.data(b"Subject: two\r\n\r\nbody\r\n"))
            return got

    async def main() -> list[tuple[int, bytes]]:
        loop = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        talking = asyncio.create_task(asyncio.to_thread(client, listener.getsockname()[1]))
        conn, _ = await loop.sock_accept(listener)
        server = SubmissionProtocol(app, connection.socket_client(app, conn))
        serving = asyncio.create_task(connection.serve(server, conn))
        try:
            return await talking
        finally:
            await serving
            listener.close()

    got = asyncio.run(main())
    assert [code for code, _ in got] == [250, 250, 451, 250, 250, 250], got
    assert got[2][1].startswith(b"4.3.0")
    assert calls == [("first@example.net",), ("second@example.net",)]
    ((env, _),) = captured_messages(capture)
    assert "-- second@example.net\n" in env
