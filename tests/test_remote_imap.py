"""-R imap:// and imaps:// against a real Dovecot: verdicts, quoting, TLS checks, latency.

The Dovecot offers STARTTLS on its imap port, so imap:// upgrades (tls=auto) and needs
the test certificate as ca_file, as imaps:// does.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator

import pytest

from auth_backends import BackendSpec, create
from ofmipd.auth import Outcome, Secret, Verdict
from ofmipd.identity import ClientIdentity
from tests.dovecot_server import Dovecot

ODD_USER = "jürgen"  # UTF-8: must travel as an IMAP literal
ODD_PASSWORD = 'p"a\\ss wörd'  # quote, backslash, space, UTF-8
USERS = {"alice": "wonderland", "bob": "builder", ODD_USER: ODD_PASSWORD}


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    # Dovecot refuses non-ASCII user names unless auth_username_chars is emptied.
    with Dovecot(USERS, extra_config="auth_username_chars =\n") as server:
        yield server


def verify(options: dict, user: str, password: str, client: ClientIdentity) -> Outcome:
    backend = create(BackendSpec(kind="imap", options=options))
    return asyncio.run(backend.verify(user, Secret(password.encode()), client))


def urls(dovecot: Dovecot) -> list[dict]:
    return [
        {"url": dovecot.url("imap"), "ca_file": str(dovecot.cert_file)},
        {"url": dovecot.url("imaps"), "ca_file": str(dovecot.cert_file)},
    ]


def test_imap_good_password_accepts(dovecot: Dovecot, client: ClientIdentity) -> None:
    for options in urls(dovecot):
        outcome = verify(options, "alice", "wonderland", client)
        assert outcome.verdict is Verdict.ACCEPT, (options, outcome)
        port = options["url"].rsplit(":", 1)[1]
        assert outcome.reason == f"127.0.0.1:{port}: IMAP OK [CAPABILITY] to LOGIN"


def test_imap_wrong_password_rejects(dovecot: Dovecot, client: ClientIdentity) -> None:
    for options in urls(dovecot):
        outcome = verify(options, "alice", "builder", client)
        assert outcome.verdict is Verdict.REJECT, (options, outcome)
        assert "NO [AUTHENTICATIONFAILED]" in outcome.reason
        assert "builder" not in outcome.reason


def test_imap_unknown_user_rejects(dovecot: Dovecot, client: ClientIdentity) -> None:
    for options in urls(dovecot):
        outcome = verify(options, "mallory", "wonderland", client)
        assert outcome.verdict is Verdict.REJECT, (options, outcome)


def test_imap_literals_carry_utf8_quotes_and_backslashes(
    dovecot: Dovecot, client: ClientIdentity
) -> None:
    options = {"url": dovecot.url("imap"), "ca_file": str(dovecot.cert_file)}
    assert verify(options, ODD_USER, ODD_PASSWORD, client).verdict is Verdict.ACCEPT
    assert verify(options, ODD_USER, ODD_PASSWORD[:-1], client).verdict is Verdict.REJECT
    # a password that needs a literal for a user that goes quoted, and the reverse
    assert verify(options, "alice", 'wonder"land', client).verdict is Verdict.REJECT
    assert verify(options, ODD_USER, "wonderland", client).verdict is Verdict.REJECT


def test_imaps_checks_the_certificate_by_default(dovecot: Dovecot, client: ClientIdentity) -> None:
    untrusted = verify({"url": dovecot.url("imaps")}, "alice", "wonderland", client)
    assert untrusted.verdict is Verdict.TEMPFAIL
    assert "certificate not trusted" in untrusted.reason
    unchecked = {"url": dovecot.url("imaps"), "verify": False}
    assert verify(unchecked, "alice", "wonderland", client).verdict is Verdict.ACCEPT


def test_imaps_checks_the_host_name(dovecot: Dovecot, client: ClientIdentity) -> None:
    # The certificate names 127.0.0.1; "localhost" reaches the same server but is not named.
    options = {"url": dovecot.url("imaps", host="localhost"), "ca_file": str(dovecot.cert_file)}
    outcome = verify(options, "alice", "wonderland", client)
    assert outcome.verdict is Verdict.TEMPFAIL
    assert "certificate not trusted" in outcome.reason


def test_imap_median_latency_of_good_logins(dovecot: Dovecot, client: ClientIdentity) -> None:
    backend = create(
        BackendSpec(kind="imap", arg=f"{dovecot.url('imap')}?ca_file={dovecot.cert_file}")
    )

    async def twenty() -> list[float]:
        times = []
        for _ in range(20):
            started = time.perf_counter()
            outcome = await backend.verify("bob", Secret(b"builder"), client)
            times.append(time.perf_counter() - started)
            assert outcome.verdict is Verdict.ACCEPT
        return times

    median = statistics.median(asyncio.run(twenty()))
    print(f"\nimap verify() median of 20 good logins: {median * 1000:.1f} ms")
    assert median < 1.0  # generous: a loaded 2-core machine; typically ~20-30 ms
