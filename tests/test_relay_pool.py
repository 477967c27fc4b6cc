"""ofmipd.relay's pool and pipelining, in-process against a scripted downstream that
records each chunk it reads: what went down in one write, how many connections were
open, when they were closed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from ofmipd import relay as relay_module
from ofmipd.identity import ClientIdentity
from ofmipd.relay import DOWNSTREAM_FAILED, POOL_BUSY, Downstream, Identity, Relay

IDENTITY = Identity(ClientIdentity("192.0.2.9", 5555), "client.example", "alice", esmtp=True)


class FakeDownstream:
    """A scripted SMTP server: 250 to everything, 354 to DATA."""

    def __init__(
        self, extensions: tuple[str, ...], slow: str = "", tls: str = "none"
    ) -> None:  # slow: upper case
        self.extensions = extensions
        self.tls = tls
        self.slow = slow  # a verb whose reply comes only after 2 s
        self.chunks: list[bytes] = []
        self.open = 0
        self.most_open = 0
        self.closed = 0
        self.server: asyncio.base_events.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        writer.write(b"220 fake ESMTP\r\n")
        buffer, in_data = b"", False
        try:
            while chunk := await reader.read(65536):
                self.chunks.append(chunk)
                buffer += chunk
                while True:
                    if in_data:
                        end = buffer.find(b"\r\n.\r\n")
                        if end < 0:
                            break
                        buffer, in_data = buffer[end + 5 :], False
                        writer.write(b"250 2.0.0 Ok: queued as FAKE\r\n")
                        continue
                    line, sep, rest = buffer.partition(b"\r\n")
                    if not sep:
                        break
                    buffer = rest
                    if self.slow and line.upper().startswith(self.slow.encode()):
                        await asyncio.sleep(2)
                    writer.write(self.answer(line.decode()))
                    in_data = line.upper() == b"DATA"
                await writer.drain()
        finally:
            self.open -= 1
            self.closed += 1
            writer.close()

    def answer(self, line: str) -> bytes:
        verb = line.split()[0].upper()
        if verb == "EHLO":
            lines = ["fake", *self.extensions]
            return "".join(f"250-{x}\r\n" for x in lines[:-1]).encode() + (
                f"250 {lines[-1]}\r\n".encode()
            )
        if verb == "DATA":
            return b"354 go ahead\r\n"
        if verb == "STARTTLS":  # with an answer injected in cleartext after the go-ahead
            return b"220 2.0.0 go ahead\r\n250 2.0.0 injected\r\n"
        return b"250 2.0.0 Ok\r\n"

    async def __aenter__(self) -> Relay:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return Relay(
            Downstream("127.0.0.1", port, False),
            tls=self.tls,
            size=2,
            identity="auto",
            hostname="ofmipd.test",
        )

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 20))


async def one_message(relay: Relay) -> str:
    reply, transaction = await relay.begin(IDENTITY, "alice@example.com", [])
    assert transaction is not None, reply
    assert (await transaction.rcpt("bob@example.org")).startswith("250")
    return await transaction.data(b"Subject: x\r\n\r\nbody\r\n")


def test_rset_xforward_and_mail_go_down_in_one_write_with_pipelining() -> None:
    fake = FakeDownstream(("PIPELINING", "XFORWARD NAME ADDR PORT PROTO HELO"))

    async def test() -> None:
        async with fake as relay:
            _, transaction = await relay.begin(IDENTITY, "alice@example.com", [])
            assert transaction is not None
            transaction.abort()  # RSET owed
            assert (await one_message(relay)).startswith("250")
            relay.close()

    run(test)
    together = [c for c in fake.chunks if c.startswith(b"RSET\r\nXFORWARD ")]
    assert together and b"\r\nMAIL FROM:<alice@example.com>\r\n" in together[0]
    assert b"ADDR=192.0.2.9" in together[0]


@pytest.mark.parametrize("offered", [("SIZE", "8BITMIME", "SMTPUTF8"), ()])
def test_mail_parameters_go_down_only_when_the_downstream_offers_them(offered) -> None:
    fake = FakeDownstream(offered)
    options = ["SIZE=1234", "BODY=8BITMIME", "SMTPUTF8"]

    async def test() -> None:
        async with fake as relay:
            reply, transaction = await relay.begin(IDENTITY, "jörg@example.com", options)
            assert transaction is not None, reply
            transaction.abort()
            relay.close()

    run(test)
    [mail] = [x for c in fake.chunks for x in c.split(b"\r\n") if x.startswith(b"MAIL ")]
    expected = " SIZE=1234 BODY=8BITMIME SMTPUTF8" if offered else ""
    assert mail == f"MAIL FROM:<jörg@example.com>{expected}".encode()


def test_without_pipelining_each_command_waits_for_its_reply() -> None:
    fake = FakeDownstream(("XFORWARD NAME ADDR PORT PROTO HELO",))

    async def test() -> None:
        async with fake as relay:
            _, transaction = await relay.begin(IDENTITY, "alice@example.com", [])
            assert transaction is not None
            transaction.abort()
            assert (await one_message(relay)).startswith("250")
            relay.close()

    run(test)
    commands = [c for c in fake.chunks if not c.startswith(b"Subject")]
    assert all(c.count(b"\r\n") == 1 for c in commands), commands
    assert b"RSET\r\n" in fake.chunks


def test_the_pool_is_bounded_and_a_waiting_mail_gets_the_freed_connection() -> None:
    fake = FakeDownstream(("PIPELINING",))

    async def test() -> None:
        async with fake as relay:  # size=2
            first = await relay.begin(IDENTITY, "a@example.com", [])
            second = await relay.begin(IDENTITY, "b@example.com", [])
            third = asyncio.create_task(relay.begin(IDENTITY, "c@example.com", []))
            await asyncio.sleep(0.3)
            assert not third.done()  # a third connection would exceed --relay-connections
            assert first[1] is not None and second[1] is not None
            first[1].abort()
            reply, transaction = await third
            assert reply.startswith("250") and transaction is not None
            transaction.abort()
            second[1].abort()
            relay.close()

    run(test)
    assert fake.most_open == 2


def test_idle_connections_close_after_the_idle_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_module, "IDLE_TIMEOUT", 0.2)
    fake = FakeDownstream(("PIPELINING",))

    async def test() -> None:
        async with fake as relay:
            assert (await one_message(relay)).startswith("250")
            assert len(relay.idle) == 1
            await asyncio.sleep(0.6)
            assert relay.idle == []
            assert fake.closed == 1

    run(test)
    assert any(c.endswith(b"QUIT\r\n") for c in fake.chunks)


def test_a_refused_connection_is_a_4xx_not_an_exception() -> None:
    async def test() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        relay = Relay(
            Downstream("127.0.0.1", port, False),
            tls="none",
            size=1,
            identity="auto",
            hostname="ofmipd.test",
        )
        assert await relay.begin(IDENTITY, "a@example.com", []) == (DOWNSTREAM_FAILED, None)
        # The slot came back: a second try is not stuck behind the first.
        assert await relay.begin(IDENTITY, "a@example.com", []) == (DOWNSTREAM_FAILED, None)

    run(test)


def test_require_without_starttls_offered_sends_nothing(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeDownstream(("PIPELINING",))

    async def test() -> None:
        async with fake as relay:
            relay.tls = "require"
            assert await relay.begin(IDENTITY, "a@example.com", []) == (DOWNSTREAM_FAILED, None)

    run(test)
    assert "STARTTLS not offered and --relay-tls require" in caplog.text
    assert not any(b"MAIL" in c for c in fake.chunks)


def test_a_cancelled_rcpt_closes_its_connection_instead_of_pooling_a_stale_reply() -> None:
    fake = FakeDownstream(("PIPELINING",), slow="RCPT")

    async def test() -> None:
        async with fake as relay:
            _, transaction = await relay.begin(IDENTITY, "a@example.com", [])
            assert transaction is not None
            task = asyncio.create_task(transaction.rcpt("b@example.org"))
            await asyncio.sleep(0.2)
            assert not task.done()  # waiting for the RCPT reply
            task.cancel()  # the client went away mid-RCPT
            transaction.abort()  # what connection_lost does
            assert relay.idle == []  # its RCPT reply is still to come: never reused

    run(test)


def test_a_cancelled_mail_gives_back_its_slot() -> None:
    fake = FakeDownstream(("PIPELINING",), slow="MAIL FROM:<SLOW")

    async def test() -> None:
        async with fake as relay:
            relay.size = 1
            task = asyncio.create_task(relay.begin(IDENTITY, "slow@example.com", []))
            await asyncio.sleep(0.2)
            assert not task.done()  # waiting for the MAIL reply
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            reply, transaction = await asyncio.wait_for(
                relay.begin(IDENTITY, "a@example.com", []), 1
            )
            assert reply.startswith("250") and transaction is not None
            transaction.abort()

    run(test)


def test_a_mail_waiting_too_long_for_a_connection_gets_451(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay_module, "ACQUIRE_TIMEOUT", 0.2)
    fake = FakeDownstream(("PIPELINING",))

    async def test() -> None:
        async with fake as relay:
            relay.size = 1
            _, held = await relay.begin(IDENTITY, "a@example.com", [])
            assert held is not None
            assert await relay.begin(IDENTITY, "b@example.com", []) == (POOL_BUSY, None)
            held.abort()

    run(test)


def test_cleartext_injected_after_the_starttls_go_ahead_is_refused() -> None:
    fake = FakeDownstream(("STARTTLS",), tls="require")

    async def test() -> None:
        async with fake as relay:
            reply, transaction = await relay.begin(IDENTITY, "alice@example.com", [])
            assert transaction is None
            assert reply.startswith("451 "), reply
            relay.close()

    run(test)
    sent = b"".join(fake.chunks)
    assert b"STARTTLS\r\n" in sent
    assert b"MAIL FROM" not in sent  # nothing went on in the clear after the injection
