"""--quota with --relay against a real Postfix: the DATA is streamed through, and quota is
charged only when Postfix's reply to the final dot is 250; a recipient Postfix refuses
at RCPT gives its reservation back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postfix_server import Postfix, login, relay_daemon, running_postfix

REFUSED = "nobody@example.org"
SIZE_LIMIT = 20000  # Postfix's message_size_limit: checked after the dot without SIZE=


@pytest.fixture(scope="module")
def postfix() -> Iterator[Postfix]:
    yield from running_postfix(refused=(REFUSED,), size_limit=SIZE_LIMIT)


def test_only_postfixs_250_after_the_dot_charges_the_message(
    tmp_path: Path, postfix: Postfix
) -> None:
    with relay_daemon(tmp_path, postfix, "--quota", "user-messages:1/1h") as daemon:
        smtp = login(daemon)
        assert smtp.mail("alice@example.com")[0] == 250  # no SIZE=: Postfix learns at the end
        assert smtp.rcpt("carol@example.org")[0] == 250
        big = b"Subject: big\r\n\r\n" + b"x" * 76 + b"\r\n"
        code, reply = smtp.data(big * (SIZE_LIMIT // 78 + 10))
        assert (code, reply[:5]) == (552, b"5.3.4"), reply  # Postfix's, after the dot
        assert smtp.mail("alice@example.com")[0] == 250  # the refused message used nothing
        assert smtp.rcpt("carol@example.org")[0] == 250
        code, reply = smtp.data(b"Subject: small\r\n\r\nbody\r\n")
        assert code == 250 and b"queued as" in reply
        code, reply = smtp.mail("alice@example.com")
        assert (code, reply[:5]) == (450, b"4.7.1")
        smtp.quit()


def test_a_recipient_postfix_refuses_gives_its_reservation_back(
    tmp_path: Path, postfix: Postfix
) -> None:
    with relay_daemon(tmp_path, postfix, "--quota", "user-recipients:2/1h") as daemon:
        smtp = login(daemon)
        assert smtp.mail("alice@example.com")[0] == 250
        assert smtp.rcpt(REFUSED)[0] == 550  # Postfix's verdict
        assert smtp.rcpt("a@example.org")[0] == 250
        assert smtp.rcpt("b@example.org")[0] == 250  # the refused one holds nothing
        code, reply = smtp.rcpt("c@example.org")
        assert (code, reply[:5]) == (452, b"4.5.3")
        assert smtp.data(b"Subject: two\r\n\r\nbody\r\n")[0] == 250
        assert smtp.mail("alice@example.com")[0] == 250
        assert smtp.rcpt("d@example.org")[0] == 452  # both charged
        smtp.quit()


def test_a_refused_recipient_leaves_the_messages_reservation_alone(
    tmp_path: Path, postfix: Postfix
) -> None:
    with relay_daemon(tmp_path, postfix, "--quota", "user-messages:1/1h") as daemon:
        smtp = login(daemon)
        assert smtp.mail("alice@example.com")[0] == 250
        assert smtp.rcpt(REFUSED)[0] == 550
        assert smtp.rcpt("a@example.org")[0] == 250
        assert smtp.data(b"Subject: one\r\n\r\nbody\r\n")[0] == 250
        assert smtp.mail("alice@example.com")[0] == 450  # the message was charged
        smtp.quit()
