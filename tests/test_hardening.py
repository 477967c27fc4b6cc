"""Abuse resistance on a real daemon: limits, protocol tricks, lock-outs, sender policy."""

from __future__ import annotations

import base64
import resource
import smtplib
import socket
import threading
import time
import urllib.request

import pytest

from tests.conftest import free_port
from tests.ofmipd_server import PROGS, Daemon, captured_messages, start_daemon

PASSWORD = "Hard-Pass-5"
PLAIN = base64.b64encode(f"\0gina\0{PASSWORD}".encode())


@pytest.fixture
def users(tmp_path):
    path = tmp_path / "users"
    path.write_text(f"gina:{PASSWORD}\nhank:hank-pw\n")
    path.chmod(0o600)
    return path


start = start_daemon


@pytest.fixture
def server(tmp_path, users, capture):
    daemon = start(tmp_path, users, capture, "--size-limit", "20000", "--max-recipients", "5")
    yield daemon
    daemon.stop()


class Raw:
    """A line-level client that can send anything, pipelined or not."""

    def __init__(self, daemon: Daemon) -> None:
        self.sock = socket.create_connection((daemon.host, daemon.port), timeout=20)
        self.reader = self.sock.makefile("rb")
        self.banner = self.reader.readline()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        """The last line of the next (possibly multi-line) reply."""
        while True:
            line = self.reader.readline()
            if not line:
                raise EOFError("connection closed")
            if line[3:4] != b"-":
                return line.rstrip(b"\r\n")

    def command(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.reply()

    def login(self) -> None:
        assert self.command(b"EHLO raw.test").startswith(b"250 ")
        assert self.command(b"AUTH PLAIN " + PLAIN).startswith(b"235 ")

    def closed(self) -> bool:
        try:
            return self.reader.readline() == b""
        except OSError:
            return True

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def test_long_command_line_is_500_and_session_continues(server):
    raw = Raw(server)
    assert raw.command(b"NOOP " + b"x" * 600).startswith(b"500 5.5.2")
    assert raw.command(b"NOOP " + b"x" * 5000).startswith(b"500 5.5.2")
    assert raw.command(b"NOOP").startswith(b"250")
    raw.close()


def test_declared_and_actual_oversize_get_552_and_nothing_delivered(server, capture):
    raw = Raw(server)
    raw.login()
    assert raw.command(b"MAIL FROM:<gina@example.org> SIZE=9999999").startswith(b"552 5.3.4")
    assert raw.command(b"MAIL FROM:<gina@example.org>").startswith(b"250")
    assert raw.command(b"RCPT TO:<x@example.net>").startswith(b"250")
    assert raw.command(b"DATA").startswith(b"354")
    raw.send(b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 30 + b".\r\n")
    assert raw.reply().startswith(b"552 5.3.4")
    raw.close()
    assert captured_messages(capture) == []


def test_data_line_over_1000_octets_is_refused_and_not_delivered(server, capture):
    raw = Raw(server)
    raw.login()
    raw.command(b"MAIL FROM:<gina@example.org>")
    raw.command(b"RCPT TO:<x@example.net>")
    assert raw.command(b"DATA").startswith(b"354")
    raw.send(b"Subject: long\r\n\r\n" + b"z" * 2000 + b"\r\n.\r\n")
    assert raw.reply().startswith(b"500 5.5.2")  # RFC 5321 4.5.3.1.6: 1000 octets a line
    assert raw.command(b"NOOP").startswith(b"250")
    raw.close()
    assert captured_messages(capture) == []


def test_session_end_line_says_who_what_and_how_it_ended(server):
    with smtplib.SMTP(server.host, server.port, timeout=20) as s:
        s.login("gina", PASSWORD)
        s.sendmail("gina@example.org", ["x@example.net"], b"Subject: s\r\n\r\nhi\r\n")
    time.sleep(0.3)
    line = [x for x in server.log_text().splitlines() if ": end client=" in x][-1]
    for part in (
        "client=127.0.0.1",
        "source=socket",
        "tls=no",
        "user=gina",
        "backend=authfile",
        "messages=1",
        "result=authenticated",
    ):
        assert part in line, line


def test_too_many_recipients_is_452(server):
    raw = Raw(server)
    raw.login()
    raw.command(b"MAIL FROM:<gina@example.org>")
    for n in range(5):
        assert raw.command(f"RCPT TO:<r{n}@example.net>".encode()).startswith(b"250")
    assert raw.command(b"RCPT TO:<r6@example.net>").startswith(b"452 4.5.3")
    raw.close()


def test_error_limit_closes_with_421(tmp_path, users, capture):
    daemon = start(tmp_path, users, capture, "--max-errors", "5")
    try:
        raw = Raw(daemon)
        raw.command(b"EHLO e.test")
        replies = [raw.command(b"MAIL FROM:<a@example.org>") for _ in range(4)]
        assert all(r.startswith(b"530") for r in replies)
        raw.send(b"MAIL FROM:<a@example.org>\r\n")
        assert raw.reply().startswith(b"530")
        assert raw.reply().startswith(b"421 4.7.0")
        assert raw.closed()
    finally:
        daemon.stop()


def test_our_injector_failing_is_not_the_clients_error(tmp_path, users):
    """Our injector's 451s never count toward --max-errors; a delivered message resets
    the count (Postfix: errors "without delivering mail"). Otherwise a user whose client
    retries through a broken injector, or makes a few typos a day on one long connection,
    is cut off for our fault."""
    daemon = start(tmp_path, users, tmp_path, "--max-errors", "3",
                   "--sendmail", str(PROGS / "exit-sendmail"))  # fmt: skip
    try:
        with smtplib.SMTP(daemon.host, daemon.port, timeout=20) as s:
            s.login("gina", PASSWORD)
            for _ in range(5):  # five 451s from the injector: the session lives on
                with pytest.raises(smtplib.SMTPDataError) as refused:
                    s.sendmail("gina@example.org", ["exit-75@example.net"], b"\r\nx\r\n")
                assert refused.value.smtp_code == 451
            for _ in range(3):  # 2 client errors, a delivery, 2 more: never 3 in a row
                assert s.rcpt("no-mail@example.net")[0] == 503
                assert s.rcpt("no-mail@example.net")[0] == 503
                s.sendmail("gina@example.org", ["ok@example.net"], b"\r\nx\r\n")
            assert s.noop()[0] == 250
            for _ in range(3):  # three in a row: the limit, so the third 503 comes with 421
                assert s.rcpt("no-mail@example.net")[0] == 503
            assert s.noop()[0] == 421  # the 421 that followed the third 503
    finally:
        daemon.stop()


def test_idle_timeout_says_421_before_closing(tmp_path, users, capture):
    daemon = start(tmp_path, users, capture, "--idle-timeout", "1")
    try:
        raw = Raw(daemon)
        raw.sock.settimeout(10)
        assert raw.reply().startswith(b"421 4.4.2")
        assert raw.closed()
    finally:
        daemon.stop()


@pytest.mark.slow
def test_idle_timeout_counts_from_the_last_command(tmp_path, users, capture):
    daemon = start(tmp_path, users, capture, "--idle-timeout", "1")
    try:
        raw = Raw(daemon)
        raw.sock.settimeout(10)
        for _ in range(6):  # 2.4 s of activity, never 1 s idle: the session lives on
            time.sleep(0.4)
            assert raw.command(b"NOOP").startswith(b"250")
        quiet = time.monotonic()
        assert raw.reply().startswith(b"421 4.4.2")
        assert 0.8 < time.monotonic() - quiet < 5
    finally:
        daemon.stop()


@pytest.mark.slow
def test_data_timeout_covers_the_message_then_the_idle_timeout_returns(tmp_path, users, capture):
    daemon = start(tmp_path, users, capture, "--idle-timeout", "1", "--data-timeout", "6")
    try:
        raw = Raw(daemon)
        raw.sock.settimeout(10)
        raw.login()
        raw.command(b"MAIL FROM:<gina@example.org>")
        raw.command(b"RCPT TO:<x@example.net>")
        assert raw.command(b"DATA").startswith(b"354")
        raw.send(b"Subject: slow\r\n\r\n")
        time.sleep(1.6)  # past the idle timeout, inside the DATA timeout
        assert raw.command(b"body\r\n.").startswith(b"250")
        done = time.monotonic()
        assert raw.reply().startswith(b"421 4.4.2")  # idle again: 1 s, not what is left of 6 s
        assert time.monotonic() - done < 3
    finally:
        daemon.stop()


def test_connections_per_client_address_are_limited(tmp_path, users, capture):
    daemon = start(tmp_path, users, capture, "--max-per-ip", "2")
    try:
        first, second = Raw(daemon), Raw(daemon)
        third = socket.create_connection((daemon.host, daemon.port), timeout=10)
        assert third.recv(200).startswith(b"421 4.7.0")
        first.close()
        time.sleep(0.3)
        fourth = Raw(daemon)
        assert fourth.banner.startswith(b"220")
        for conn in (second, fourth):
            conn.close()
        third.close()
    finally:
        daemon.stop()


@pytest.mark.parametrize("trick", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r"])
def test_smuggling_variants_never_end_the_message_early(server, capture, trick):
    raw = Raw(server)
    raw.login()
    raw.command(b"MAIL FROM:<gina@example.org>")
    raw.command(b"RCPT TO:<x@example.net>")
    assert raw.command(b"DATA").startswith(b"354")
    smuggled = b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
    raw.send(b"Subject: a\r\n\r\nfirst" + trick + smuggled + b"tail\r\n.\r\n")
    assert raw.reply().startswith(b"250 ")
    assert raw.command(b"QUIT").startswith(b"221")
    ((env, message),) = captured_messages(capture)
    assert "victim" not in env
    assert b"evil@example.org" in message and b"tail" in message


def test_pipelined_auth_and_mail_in_one_packet(server, capture):
    raw = Raw(server)
    raw.send(
        b"EHLO p.test\r\nAUTH PLAIN " + PLAIN + b"\r\nMAIL FROM:<gina@example.org>\r\n"
        b"RCPT TO:<x@example.net>\r\nDATA\r\n"
    )
    replies = [raw.reply() for _ in range(5)]
    assert [r[:3] for r in replies] == [b"250", b"235", b"250", b"250", b"354"]
    raw.send(b"Subject: p\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert raw.reply().startswith(b"250")
    assert len(captured_messages(capture)) == 1


def test_huge_auth_payload_nul_and_bad_utf8(server):
    raw = Raw(server)
    raw.command(b"EHLO h.test")
    assert raw.command(b"AUTH PLAIN " + b"A" * 10000).startswith(b"500 5.5.2")
    assert raw.command(b"AUTH PLAIN")[:3] == b"334"
    assert raw.command(b"A" * 10000).startswith(b"500 5.5.6")
    assert raw.command(b"NO\0OP")[:1] == b"5"
    assert raw.command(b"MAIL FROM:<\xff\xfe@example.org>")[:1] == b"5"
    assert raw.command(b"NOOP").startswith(b"250")
    raw.close()


@pytest.mark.parametrize("path", [b'"', b"<a@[>", b"<<>>", b"<a@b.>", b"<@>"])
def test_garbage_paths_get_a_syntax_error_not_an_internal_error(server, path):
    # The email package's parser raises IndexError/AttributeError on some of these.
    raw = Raw(server)
    raw.login()
    assert raw.command(b"MAIL FROM:" + path)[:4] in (b"553 ", b"501 ")
    assert raw.command(b"MAIL FROM:<gina@example.org>").startswith(b"250")
    assert raw.command(b"RCPT TO:" + path)[:4] in (b"553 ", b"501 ")
    raw.close()
    assert "Traceback" not in server.log_text()


def test_helo_with_a_thousand_labels_and_ten_thousand_rcpts(tmp_path, users, capture):
    daemon = start(tmp_path, users, capture, "--max-recipients", "5", "--max-errors", "20000")
    try:
        raw = Raw(daemon)
        assert raw.command(b"EHLO " + b"a." * 1000 + b"test")[:3] in (b"250", b"500")
        assert raw.command(b"EHLO ok.test").startswith(b"250")
        assert raw.command(b"AUTH PLAIN " + PLAIN).startswith(b"235")
        raw.command(b"MAIL FROM:<gina@example.org>")
        codes: list[bytes] = []
        ended: list[Exception] = []

        def read_all() -> None:
            try:
                while True:
                    codes.append(raw.reply()[:3])
            except (EOFError, OSError) as error:
                ended.append(error)

        reader = threading.Thread(target=read_all)
        reader.start()  # read while writing, or both sides' buffers fill up
        try:
            raw.send(b"".join(f"RCPT TO:<r{n}@example.net>\r\n".encode() for n in range(10000)))
        except OSError:
            pass  # closed by the command limit before we finished writing
        rss_kb = int(open(f"/proc/{daemon.proc.pid}/status").read().split("VmRSS:")[1].split()[0])
        reader.join(60)
        raw.close()
        # 5 recipients fit; each further one is refused; the 1001st RCPT crosses the
        # per-session command limit (default 1000) and the session ends with 421.
        assert codes[:5] == [b"250"] * 5
        if ended and isinstance(ended[0], ConnectionResetError):
            # The server closed with our unsent-to commands still unread, so its kernel
            # answered with a reset, which drops replies we had not read yet (a busy
            # machine reads late): the ones that came are right, and the log has the limit.
            assert 5 < len(codes) <= 1001, len(codes)
            assert codes[5:1000] == [b"452"] * len(codes[5:1000])
            assert codes[1000:] in ([], [b"421"])
            assert "over limit for RCPT" in daemon.log_text()
        else:
            assert codes[5:1000] == [b"452"] * 995
            assert codes[1000:] == [b"421"]
        assert rss_kb < 150_000
    finally:
        daemon.stop()


def test_error_limit_ends_a_recipient_flood(server):
    raw = Raw(server)
    raw.login()
    raw.command(b"MAIL FROM:<gina@example.org>")
    codes = [raw.command(f"RCPT TO:<r{n}@example.net>".encode())[:3] for n in range(25)]
    assert codes[:5] == [b"250"] * 5 and codes[5:] == [b"452"] * 20  # 20 errors: the limit
    assert raw.reply().startswith(b"421 4.7.0")
    assert raw.closed()


@pytest.mark.slow
def test_repeated_failures_lock_out_without_asking_the_backend(tmp_path, users, capture):
    daemon = start(tmp_path, users, capture, "--ratelimit", "memory")
    try:
        wrong = base64.b64encode(b"\0gina\0not-it")
        codes = []
        for _ in range(7):
            raw = Raw(daemon)
            raw.command(b"EHLO l.test")
            codes.append(raw.command(b"AUTH PLAIN " + wrong)[:3])
            raw.close()
        raw = Raw(daemon)
        raw.command(b"EHLO l.test")
        right = raw.command(b"AUTH PLAIN " + PLAIN)
        raw.close()
        time.sleep(0.2)
        log = daemon.log_text()
    finally:
        daemon.stop()
    assert codes[:5] == [b"535"] * 5
    assert codes[5:] == [b"454"] * 2
    assert right.startswith(b"454 4.7.0")  # even the right password waits out the lock
    assert log.count("auth reject:") == 5  # the backend was not asked again
    assert "auth refused: client=127.0.0.1" in log


def test_sender_map_refuses_foreign_senders(tmp_path, users, capture):
    senders = tmp_path / "senders"
    senders.write_text("gina  gina@example.org, @gina.example\n* @example.net\n")
    daemon = start(tmp_path, users, capture, "--sender-map", str(senders))
    try:
        raw = Raw(daemon)
        raw.login()
        assert raw.command(b"MAIL FROM:<boss@example.org>").startswith(b"553 5.7.1")
        assert raw.command(b"MAIL FROM:<any@gina.example>").startswith(b"250")
        raw.command(b"RSET")
        assert raw.command(b"MAIL FROM:<Gina@Example.org>").startswith(b"250")
        raw.command(b"RSET")
        assert raw.command(b"MAIL FROM:<>").startswith(b"250")
        raw.close()
    finally:
        daemon.stop()


@pytest.mark.slow
def test_metrics_endpoint_counts_sessions_auth_and_deliveries(tmp_path, users, capture):
    metrics_port = free_port()
    daemon = start(tmp_path, users, capture, "--metrics", f"127.0.0.1:{metrics_port}")
    try:
        with smtplib.SMTP(daemon.host, daemon.port, timeout=20) as s:
            s.ehlo("m.test")
            assert s.login("gina", PASSWORD)[0] == 235
            s.sendmail("gina@example.org", ["x@example.net"], b"Subject: m\r\n\r\nhi\r\n")
        with smtplib.SMTP(daemon.host, daemon.port, timeout=20) as s:
            s.ehlo("m.test")
            with pytest.raises(smtplib.SMTPAuthenticationError):
                s.login("gina", "wrong")
        time.sleep(0.3)
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
            .read()
            .decode()
        )
    finally:
        daemon.stop()
    lines = [line for line in text.splitlines() if not line.startswith("#")]

    def value(prefix: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))

    assert value('ofmipd_auth_attempts_total{backend="authfile",verdict="accept"}') == 1
    assert value('ofmipd_auth_attempts_total{backend="authfile",verdict="reject"}') >= 1
    assert value("ofmipd_auth_decisions_total") >= 2
    assert value("ofmipd_deliveries_total") >= 1
    assert value("ofmipd_sessions_total") >= 2


def test_many_idle_sessions_hold_bounded_memory(tmp_path, users, capture):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), max(hard, 4096)))
    daemon = start(tmp_path, users, capture, "-C", "600", "--max-per-ip", "600")
    conns = []
    try:
        for _ in range(500):
            raw = Raw(daemon)
            raw.command(b"EHLO idle.test")
            conns.append(raw)
        rss_kb = int(open(f"/proc/{daemon.proc.pid}/status").read().split("VmRSS:")[1].split()[0])
        assert conns[-1].command(b"NOOP").startswith(b"250")
    finally:
        for raw in conns:
            raw.close()
        daemon.stop()
    assert rss_kb < 200_000  # 500 sessions must not cost hundreds of megabytes
