"""--relay streams DATA to a real Postfix (tests/postfix_server.py): the message goes down
while the client sends it, ofmipd's memory does not grow with it, and a message that
fails before its end (client gone, too big, forged header From) is never queued."""

from __future__ import annotations

import asyncio
import hashlib
import re
import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.ofmipd_server import Daemon, authfile, server_env
from tests.postfix_server import Postfix, login, queue_id, relay_daemon, running_postfix

LOST = r"lost connection after DATA"
FROM = b"From: alice@example.com\r\n"  # else Postfix adds one


@pytest.fixture(scope="module")
def postfix() -> Iterator[Postfix]:
    yield from running_postfix(keep=True, size_limit=50_000_000)


def kept(postfix: Postfix, qid: str, rcpt: str) -> bytes:
    """The message as Postfix's pipe got it, once delivered."""
    assert postfix.wait_for_log(rf"{qid}: to=<{rcpt}>.*status=sent", timeout=60)
    return (postfix.kept / qid).read_bytes()


def body_of(delivered: bytes) -> bytes:
    return delivered.partition(b"\n\n")[2]


def lost_count(postfix: Postfix) -> int:
    return len(re.findall(LOST, postfix.maillog()))


def queued_from(postfix: Postfix, sender: str) -> list[str]:
    """qmgr's lines for messages from `sender`: one per message Postfix queued."""
    return [x for x in postfix.maillog().splitlines() if f"from=<{sender}>, size=" in x]


def incoming_bytes(postfix: Postfix) -> int:
    """What Postfix's cleanup has written so far of messages still being received."""
    return sum(f.stat().st_size for f in (postfix.root / "spool" / "incoming").rglob("*"))


def wait_until(condition, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def peak_rss(daemon: Daemon) -> int:
    status = Path(f"/proc/{daemon.proc.pid}/status").read_text()
    found = re.search(r"VmHWM:\s+(\d+) kB", status)
    assert found
    return int(found.group(1)) * 1024


def on_the_wire(lines: bytes) -> bytes:
    """Dot-stuffed, as a client sends it (smtplib.SMTP.send does not)."""
    return re.sub(rb"(?m)^\.", b"..", lines)


def big_body(size: int) -> bytes:
    """`size` octets of 78-octet lines, some starting with dots (stuffed on the wire)."""
    lines = []
    for n in range(size // 80):
        digest = hashlib.sha256(n.to_bytes(4, "big")).hexdigest()
        lines.append((b"." if n % 7 == 0 else b"") + (digest * 2)[:76].encode() + b"\r\n")
    return b"".join(lines)


@pytest.mark.slow  # 20 MB through ofmipd and Postfix: a few seconds
def test_a_20_mb_message_goes_through_intact_without_ofmipd_holding_it(
    tmp_path: Path, postfix: Postfix
) -> None:
    body = big_body(20_000_000)
    message = b"From: alice@example.com\r\nSubject: big\r\n\r\n" + body
    with relay_daemon(tmp_path, postfix, "--size-limit", "40000000") as daemon:
        smtp = login(daemon)  # a first message: every module of the path is loaded
        smtp.sendmail("alice@example.com", ["warm@example.org"], b"Subject: warm\r\n\r\nx\r\n")
        before = peak_rss(daemon)
        smtp.mail("alice@example.com")
        assert smtp.rcpt("big@kept.test")[0] == 250
        code, reply = smtp.data(message)
        assert code == 250, reply
        grown = peak_rss(daemon) - before
        smtp.quit()
    delivered = kept(postfix, queue_id(reply), "big@kept.test")
    expected = body.replace(b"\r\n", b"\n")  # Postfix hands it on with LF line endings
    assert hashlib.sha256(body_of(delivered)).digest() == hashlib.sha256(expected).digest()
    # Buffered whole, the message alone would be 20 MB (and its copies more).
    assert grown < 4_000_000, grown


def test_postfix_has_the_start_of_the_message_before_the_client_sends_its_end(
    tmp_path: Path, postfix: Postfix
) -> None:
    half = big_body(2_000_000)
    with relay_daemon(tmp_path, postfix) as daemon:
        smtp = login(daemon)
        smtp.mail("alice@example.com")
        assert smtp.rcpt("stream@kept.test")[0] == 250
        smtp.putcmd("data")
        assert smtp.getreply()[0] == 354
        smtp.send(b"Subject: streamed\r\n\r\n" + on_the_wire(half))
        # The client pauses mid-message: its first half is in Postfix's queue file already.
        streamed = wait_until(lambda: incoming_bytes(postfix) > 1_500_000)
        smtp.send(on_the_wire(half) + b".\r\n")
        code, reply = smtp.getreply()
        smtp.quit()
    assert streamed
    assert code == 250, reply
    delivered = kept(postfix, queue_id(reply), "stream@kept.test")
    assert body_of(delivered) == (half + half).replace(b"\r\n", b"\n")


def test_a_client_gone_mid_data_leaves_nothing_queued_and_the_pool_works(
    tmp_path: Path, postfix: Postfix
) -> None:
    lost = lost_count(postfix)
    with relay_daemon(tmp_path, postfix, "--relay-connections", "1") as daemon:
        smtp = login(daemon)
        smtp.mail("vanished@example.com")
        assert smtp.rcpt("gone@example.org")[0] == 250
        smtp.putcmd("data")
        assert smtp.getreply()[0] == 354
        smtp.send(b"Subject: half\r\n\r\n" + big_body(1_000_000))
        assert wait_until(lambda: incoming_bytes(postfix) > 500_000)  # Postfix has begun
        smtp.close()  # gone, without the end of the message
        # Postfix saw the connection drop mid-DATA: it throws the partial message away.
        assert len(postfix.wait_for_log(LOST, count=lost + 1)) == lost + 1
        smtp = login(daemon)  # the only pooled connection was discarded: a new one
        assert (
            smtp.sendmail("alice@example.com", ["next@example.org"], b"Subject: n\r\n\r\nb\r\n")
            == {}
        )
        smtp.quit()
    assert postfix.wait_for_log(r"to=<next@example.org>.*status=sent")
    assert not queued_from(postfix, "vanished@example.com")
    assert "gone@example.org" not in postfix.maillog()


def test_over_the_size_limit_mid_stream_is_552_and_nothing_queued(
    tmp_path: Path, postfix: Postfix
) -> None:
    lost = lost_count(postfix)
    with relay_daemon(tmp_path, postfix, "--size-limit", "200000") as daemon:
        smtp = login(daemon)
        smtp.mail("toobig@example.com")  # no SIZE: the limit is found mid-message
        assert smtp.rcpt("huge@example.org")[0] == 250
        code, reply = smtp.data(b"Subject: huge\r\n\r\n" + big_body(600_000))
        assert (code, reply) == (552, b"5.3.4 Message size exceeds fixed limit")
        assert len(postfix.wait_for_log(LOST, count=lost + 1)) == lost + 1
        # The same session goes on.
        assert (
            smtp.sendmail("alice@example.com", ["small@example.org"], b"Subject: s\r\n\r\nb\r\n")
            == {}
        )
        smtp.quit()
    assert postfix.wait_for_log(r"to=<small@example.org>.*status=sent")
    assert not queued_from(postfix, "toobig@example.com")
    assert "huge@example.org" not in postfix.maillog()
    assert "result=552" not in daemon.log_text()  # refused before delivery, as with sendmail


def test_forged_header_from_is_550_and_nothing_goes_down(tmp_path: Path, postfix: Postfix) -> None:
    senders = tmp_path / "senders"
    senders.write_text("alice alice@example.org\n")
    lost = lost_count(postfix)
    args = ("--sender-map", str(senders), "--check-header-from")
    with relay_daemon(tmp_path, postfix, *args) as daemon:
        smtp = login(daemon)
        smtp.mail("alice@example.org")
        assert smtp.rcpt("forged@kept.test")[0] == 250
        code, reply = smtp.data(b"From: boss@example.org\r\nSubject: f\r\n\r\n" + big_body(200_000))
        assert code == 550 and reply.startswith(b"5.7.1 Header From")
        assert len(postfix.wait_for_log(LOST, count=lost + 1)) == lost + 1
        # The session goes on, and its own From goes through.
        smtp.mail("alice@example.org")
        assert smtp.rcpt("own@kept.test")[0] == 250
        code, reply = smtp.data(b"From: alice@example.org\r\n\r\nmine\r\n")
        assert code == 250, reply
        smtp.quit()
    assert kept(postfix, queue_id(reply), "own@kept.test").endswith(b"\n\nmine\n")
    assert not [x for x in postfix.maillog().splitlines() if "forged@kept.test" in x]
    assert "may not use header From/Sender boss@example.org" in daemon.log_text()


def test_a_throttle_refusal_drops_the_message_before_its_end(
    tmp_path: Path, postfix: Postfix
) -> None:
    # The throttle script runs once the message is in, before the final dot goes down.
    from tests.ofmipd_server import PROGS

    lost = lost_count(postfix)
    users = authfile(tmp_path, "alice:secret\nbob:secret\n")
    port = free_port()
    args = ["-p", f"127.0.0.1:{port}", "-a", str(users), "-L", "-t", str(PROGS / "throttle"),
            "--relay", f"smtp://127.0.0.1:{postfix.port}"]  # fmt: skip
    with Daemon(args, port, tmp_path, env=server_env(THROTTLE_DENY="alice")) as daemon:
        smtp = login(daemon)
        smtp.mail("alice@example.com")
        assert smtp.rcpt("throttled@example.org")[0] == 250
        code, reply = smtp.data(b"Subject: t\r\n\r\nbody\r\n")
        smtp.quit()
        assert (code, reply[:5]) == (450, b"4.7.1")
        assert len(postfix.wait_for_log(LOST, count=lost + 1)) == lost + 1
        smtp = smtplib.SMTP(daemon.host, daemon.port, timeout=60)
        smtp.login("bob", "secret")
        assert smtp.sendmail("bob@example.com", ["free@example.org"], FROM + b"\r\nb\r\n") == {}
        smtp.quit()
    assert postfix.wait_for_log(r"to=<free@example.org>.*status=sent")
    assert "throttled@example.org" not in postfix.maillog()
    assert "result=450" in daemon.log_text()


def test_received_and_fix_ups_arrive_downstream_as_with_sendmail(
    tmp_path: Path, postfix: Postfix
) -> None:
    # A header section longer than a read chunk, then no empty line: the first line that
    # is not a field starts the body (fixups.header_end), as with the other targets.
    fields = b"".join(b"X-Filler-%d: %s\r\n" % (n, b"f" * 60) for n in range(1000))
    with relay_daemon(tmp_path, postfix) as daemon:
        smtp = login(daemon)
        smtp.mail("alice@example.com")
        assert smtp.rcpt("fixed@kept.test")[0] == 250
        code, reply = smtp.data(FROM + b"Subject: no id\r\n" + fields + b"body line\r\n.dot\r\n")
        assert code == 250, reply
        smtp.mail("alice@example.com")
        assert smtp.rcpt("complete@kept.test")[0] == 250
        complete = (
            FROM + b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <kept@x>\r\n\r\nb\r\n"
        )
        code, second = smtp.data(complete)
        assert code == 250, second
        smtp.quit()
    text = kept(postfix, queue_id(reply), "fixed@kept.test")
    head, _, body = text.partition(b"\n\n")
    lines = head.split(b"\n")
    ours = [n for n, line in enumerate(lines) if line.startswith(b"Received: from client.example")]
    assert len(ours) == 1  # after Postfix's own Received
    received = b"\n".join(lines[ours[0] : ours[0] + 4])
    assert re.search(rb"\tby mx\.test \(ofmipd\) with ESMTPA id [0-9A-F]+;", received)
    assert b"(authenticated user alice)" in received
    assert lines[ours[0] + 4 : ours[0] + 6] == [b"From: alice@example.com", b"Subject: no id"]
    assert b"\n".join(lines[-1002:-2]) == fields.replace(b"\r\n", b"\n").rstrip(b"\n")
    assert re.fullmatch(rb"Message-ID: <[0-9A-F]+\.[0-9a-f]{12}@mx\.test>", lines[-2])
    assert lines[-1].startswith(b"Date: ")
    assert body == b"body line\n.dot\n"
    untouched = kept(postfix, queue_id(second), "complete@kept.test")
    assert untouched.endswith(complete.replace(b"\r\n", b"\n"))
    assert f"size={len(FROM) + 16 + len(fields) + 17} " in daemon.log_text()


# ---- a downstream that stops reading: in-process, with a sink that can be told to -------


class StalledSink:
    """An SMTP server that answers until DATA's 354, then reads nothing more: its socket's
    small receive buffer fills and ofmipd's writes wait."""

    def __init__(self) -> None:
        self.received = b""  # what it read after the 354
        self.closed = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink ESMTP\r\n")
        while line := await reader.readline():
            verb = line.split()[0].upper() if line.split() else b""
            if verb == b"EHLO":
                writer.write(b"250-sink\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"250 2.0.0 Ok\r\n")
        await asyncio.sleep(3)  # stalled: longer than the DATA timeout below
        self.received = await reader.read()  # then everything ofmipd sent, to its close
        self.closed.set()
        writer.close()


@pytest.mark.slow  # the stall outlasts the DATA timeout: 3 s
def test_a_downstream_that_stops_reading_slows_the_client_then_fails_the_message_451(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ofmipd import cli, connection, relay
    from ofmipd.assemble import build_app
    from ofmipd.smtp import SubmissionProtocol

    monkeypatch.setattr(relay, "DATA_TIMEOUT", 1.0)  # the sink stalls for 3 s
    sink = StalledSink()
    downstream = socket.create_server(("127.0.0.1", 0))
    downstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # for accepted sockets
    users = authfile(tmp_path, "alice:secret\n")
    relay_url = f"smtp://127.0.0.1:{downstream.getsockname()[1]}"
    args = cli.build_parser().parse_args(
        ["-a", str(users), "--relay", relay_url, "--relay-tls", "none", "--no-reverse-dns"]
    )
    app = build_app(cli.config_from_args(args))
    body = big_body(8_000_000)

    def client(port: int) -> tuple[tuple[int, bytes], float]:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            assert smtp.sock is not None
            smtp.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
            smtp.login("alice", "secret")
            smtp.mail("alice@example.com")
            smtp.rcpt("bob@example.org")
            smtp.putcmd("data")
            assert smtp.getreply()[0] == 354
            started = time.monotonic()
            smtp.send(b"Subject: stalled\r\n\r\n" + on_the_wire(body) + b".\r\n")
            sending = time.monotonic() - started  # how long the client was held up
            return smtp.getreply(), sending

    async def main() -> tuple[tuple[int, bytes], float]:
        loop = asyncio.get_running_loop()
        downstream.setblocking(False)
        sinking = await asyncio.start_server(sink.handle, sock=downstream)
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # kernel buffers
        listener.setblocking(False)  # small both ways: what waits is ofmipd
        talking = asyncio.create_task(asyncio.to_thread(client, listener.getsockname()[1]))
        conn, _ = await loop.sock_accept(listener)
        server = SubmissionProtocol(app, connection.socket_client(app, conn))
        serving = asyncio.create_task(connection.serve(server, conn))
        try:
            result = await talking
            await asyncio.wait_for(sink.closed.wait(), 10)
            return result
        finally:
            await serving
            listener.close()
            sinking.close()

    (code, reply), sending = asyncio.run(main())
    assert (code, reply) == (451, b"4.4.0 Relay to the mail system failed, try again later")
    # Back-pressure: ofmipd stopped reading the client while the downstream did not read
    # (buffering the message instead, it would have taken it all at once).
    assert sending >= 0.9 * relay.DATA_TIMEOUT
    # Only part of the message went down, and never its end: the sink can queue nothing.
    assert 0 < len(sink.received) < len(body) // 2
    assert not sink.received.endswith(b"\r\n.\r\n")
