"""-R pop3://, pop3s:// and apop:// against a real Dovecot: verdicts, APOP, TLS, latency.

The Dovecot offers STLS on its pop3 port, so pop3:// and apop:// upgrade (tls=auto) and
need the test certificate as ca_file, as pop3s:// does.
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

USERS = {"alice": "wonderland", "bob": "builder", "carol": 'two words ünd "quotes"'}


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    with Dovecot(USERS) as server:
        yield server


def verify(options: dict, user: str, password: str, client: ClientIdentity) -> Outcome:
    backend = create(BackendSpec(kind="pop3", options=options))
    return asyncio.run(backend.verify(user, Secret(password.encode()), client))


def all_three(dovecot: Dovecot) -> list[dict]:
    ca_file = str(dovecot.cert_file)
    return [
        {"url": dovecot.url("pop3"), "ca_file": ca_file},
        {"url": dovecot.url("apop"), "ca_file": ca_file},
        {"url": dovecot.url("pop3s"), "ca_file": ca_file},
    ]


def test_pop3_and_apop_good_password_accepts(dovecot: Dovecot, client: ClientIdentity) -> None:
    for options in all_three(dovecot):
        for user, password in USERS.items():
            outcome = verify(options, user, password, client)
            assert outcome.verdict is Verdict.ACCEPT, (options, user, outcome)
    apop = verify(all_three(dovecot)[1], "alice", "wonderland", client)
    assert apop.reason.endswith("POP3 +OK to APOP")


@pytest.mark.slow
def test_pop3_and_apop_wrong_password_rejects(dovecot: Dovecot, client: ClientIdentity) -> None:
    for options in all_three(dovecot):
        outcome = verify(options, "alice", "builder", client)
        assert outcome.verdict is Verdict.REJECT, (options, outcome)
        assert "-ERR [AUTH]" in outcome.reason
        assert "builder" not in outcome.reason


@pytest.mark.slow
def test_pop3_and_apop_unknown_user_rejects(dovecot: Dovecot, client: ClientIdentity) -> None:
    for options in all_three(dovecot):
        outcome = verify(options, "mallory", "wonderland", client)
        assert outcome.verdict is Verdict.REJECT, (options, outcome)


def test_apop_refuses_user_names_with_spaces_without_asking(
    dovecot: Dovecot, client: ClientIdentity
) -> None:
    outcome = verify({"url": dovecot.url("apop")}, "alice wonderland", "x", client)
    assert outcome.verdict is Verdict.REJECT
    assert "space" in outcome.reason


def test_apop_without_timestamp_in_greeting_tempfails(client: ClientIdentity) -> None:
    # Dovecot puts the APOP timestamp in its greeting only when APOP is enabled.
    with Dovecot(USERS, tls=False, extra_config="auth_mechanisms = plain login\n") as plain:
        outcome = verify({"url": plain.url("apop")}, "alice", "wonderland", client)
        assert outcome.verdict is Verdict.TEMPFAIL
        assert "no APOP timestamp" in outcome.reason
        # USER/PASS still works there
        assert verify({"url": plain.url("pop3")}, "alice", "wonderland", client).verdict is (
            Verdict.ACCEPT
        )


def test_pop3s_checks_the_certificate_by_default(dovecot: Dovecot, client: ClientIdentity) -> None:
    untrusted = verify({"url": dovecot.url("pop3s")}, "alice", "wonderland", client)
    assert untrusted.verdict is Verdict.TEMPFAIL
    assert "certificate not trusted" in untrusted.reason
    unchecked = {"url": dovecot.url("pop3s"), "verify": "false"}
    assert verify(unchecked, "alice", "wonderland", client).verdict is Verdict.ACCEPT


@pytest.mark.slow
def test_pop3_median_latency_of_good_logins(dovecot: Dovecot, client: ClientIdentity) -> None:
    medians = {}
    for scheme in ("pop3", "apop"):
        url = f"{dovecot.url(scheme)}?ca_file={dovecot.cert_file}"
        backend = create(BackendSpec(kind="pop3", arg=url))

        async def twenty(backend=backend) -> list[float]:
            times = []
            for _ in range(20):
                started = time.perf_counter()
                outcome = await backend.verify("bob", Secret(b"builder"), client)
                times.append(time.perf_counter() - started)
                assert outcome.verdict is Verdict.ACCEPT
            return times

        medians[scheme] = statistics.median(asyncio.run(twenty()))
        print(f"\n{scheme} verify() median of 20 good logins: {medians[scheme] * 1000:.1f} ms")
    assert max(medians.values()) < 1.0  # generous: a loaded 2-core machine; typically ~25 ms
