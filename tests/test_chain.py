"""The chain's rules: order, first accept wins, outages mean try later, containment.

These backends are tiny stand-ins written for the chain's contract (an exception,
a hang); the real stores have their own tests against real servers.
"""

import asyncio

import pytest

from ofmipd.auth import Chain, Found, Secret, Verdict, accept, reject, tempfail


class Fixed:
    def __init__(self, name, outcome=None, delay=0.0, error=None):
        self.name, self.target, self.outcome, self.delay, self.error = (
            name,
            "-",
            outcome,
            delay,
            error,
        )
        self.calls = 0

    async def verify(self, user, secret, client):
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.error:
            raise self.error
        return self.outcome


class Plain(Fixed):
    def __init__(self, name, users):
        super().__init__(name)
        self.users = users

    async def lookup_plaintext(self, user, client):
        if user in self.users:
            return Found(Secret(self.users[user]), user)
        return reject("no such user")


def run(coro):
    return asyncio.run(coro)


def test_first_accept_wins_and_later_backends_are_not_asked(client):
    first, second = Fixed("a", accept()), Fixed("b", accept())
    decision = run(Chain([first, second]).authenticate(b"u", b"p", client))
    assert decision.verdict is Verdict.ACCEPT
    assert decision.decided_by.backend == "a"
    assert second.calls == 0


def test_user_known_only_to_last_backend_is_accepted(client):
    chain = Chain([Fixed("a", reject("no")), Fixed("b", reject("no")), Fixed("c", accept())])
    decision = run(chain.authenticate(b"u", b"p", client))
    assert decision.verdict is Verdict.ACCEPT
    assert [a.backend for a in decision.attempts] == ["a", "b", "c"]


def test_outage_plus_rejection_is_tempfail(client):
    chain = Chain([Fixed("ldap", tempfail("down")), Fixed("file", reject("mismatch"))])
    assert run(chain.authenticate(b"u", b"p", client)).verdict is Verdict.TEMPFAIL


def test_outage_plus_acceptance_is_accept(client):
    chain = Chain([Fixed("ldap", tempfail("down")), Fixed("file", accept())])
    assert run(chain.authenticate(b"u", b"p", client)).verdict is Verdict.ACCEPT


def test_exception_becomes_tempfail_naming_its_type(client):
    chain = Chain([Fixed("x", error=RuntimeError("boom with secret"))])
    decision = run(chain.authenticate(b"u", b"p", client))
    assert decision.verdict is Verdict.TEMPFAIL
    assert decision.reason == "internal error: RuntimeError"


def test_hung_backend_becomes_tempfail_after_timeout(client):
    chain = Chain([Fixed("slow", accept(), delay=5)], timeout=0.2)
    decision = run(chain.authenticate(b"u", b"p", client))
    assert decision.verdict is Verdict.TEMPFAIL
    assert "0.2s" in decision.reason


def test_try_all_asks_every_backend(client):
    chain = Chain([Fixed("a", accept()), Fixed("b", reject("no"))])
    decision = run(chain.authenticate(b"u", b"p", client, try_all=True))
    assert decision.verdict is Verdict.ACCEPT
    assert len(decision.attempts) == 2


@pytest.mark.parametrize(
    "user,password",
    [
        (b"", b"p"),
        (b"u", b""),
        (b"u", b"p\0q"),
        (b"u\nx", b"p"),
        (b"u\rx", b"p"),
        (b"u\0x", b"p"),
        (b"\xff\xfe", b"p"),
    ],
)
def test_malformed_credentials_never_reach_a_backend(client, user, password):
    backend = Fixed("a", accept())
    decision = run(Chain([backend]).authenticate(user, password, client))
    assert decision.verdict is Verdict.REJECT
    assert "malformed" in decision.reason
    assert backend.calls == 0


@pytest.mark.parametrize(
    ("user", "why"),
    [
        ("alice ", "leading or trailing whitespace"),
        ("\talice", "control character"),
        ("alice\u00a0", "leading or trailing whitespace"),  # NBSP
        ("\u3000alice", "leading or trailing whitespace"),  # ideographic space
        ("ali\x85ce", "control character"),  # NEL
        ("ali\x9bce", "control character"),  # C1 CSI
        ("ali\x7fce", "control character"),  # DEL
        ("ali\x1bce", "control character"),  # ESC
        ("ali\u2028ce", "control character"),
        ("ali\u2029ce", "control character"),
        ("a" * 257, "longer than 256 bytes"),
        ("\u00e9" * 129, "longer than 256 bytes"),  # 129 characters, 258 bytes
    ],
)
def test_door_refuses_names_a_store_might_fold_or_a_log_might_split(client, user, why):
    backend = Fixed("a", accept())
    decision = run(Chain([backend]).authenticate(user.encode(), b"p", client))
    assert (decision.verdict, decision.user, backend.calls) == (Verdict.REJECT, None, 0)
    assert decision.reason.startswith("malformed credentials: ") and why in decision.reason
    assert decision.decided_by.backend == "door"
    cram = run(
        Chain([Plain("a", {user: b"p"})]).authenticate_cram_md5(user.encode(), b"c", "", client)
    )
    assert cram.verdict is Verdict.REJECT and why in cram.reason


def test_door_draws_its_lines_exactly(client):
    def verdict(user: str) -> Verdict:
        return run(Chain([Fixed("a", accept())]).authenticate(user.encode(), b"p", client)).verdict

    # Inner spaces, apostrophes and full-width letters are names; the store decides.
    for fine in ("Anne Marie", "o'brien", "\uff41\uff4c\uff49\uff43\uff45", "a" * 256):
        assert verdict(fine) is Verdict.ACCEPT, fine
    assert verdict("\u00e9" * 128) is Verdict.ACCEPT  # 256 bytes
    assert verdict("\u00e9" * 128 + "a") is Verdict.REJECT  # 257 bytes
    assert verdict("a" * 257) is Verdict.REJECT


@pytest.mark.parametrize("canonical", ["alice\n", " alice", "a" * 300, ""])
def test_unusable_canonical_name_from_a_backend_is_a_tempfail(client, canonical):
    # The store's name becomes the session's identity; it must pass the door's rules too.
    decision = run(Chain([Fixed("a", accept("ok", canonical))]).authenticate(b"u", b"p", client))
    assert decision.verdict is Verdict.TEMPFAIL
    assert "canonical name is unusable" in decision.reason


def test_tempfail_is_decided_by_the_backend_that_failed_not_the_last_asked(client):
    chain = Chain([Fixed("ldap", tempfail("LDAP serverDown")), Fixed("authfile", reject("no"))])
    decision = run(chain.authenticate(b"u", b"p", client))
    assert decision.verdict is Verdict.TEMPFAIL
    assert (decision.decided_by.backend, decision.reason) == ("ldap", "LDAP serverDown")
    rejected = run(
        Chain([Fixed("a", reject("x")), Fixed("b", reject("y"))]).authenticate(b"u", b"p", client)
    )
    assert (rejected.decided_by.backend, rejected.reason) == ("b", "y")


def test_cram_md5_needs_every_backend_to_look_up_plaintext():
    assert Chain([Plain("a", {})]).supports_cram_md5
    assert not Chain([Plain("a", {}), Fixed("b", accept())]).supports_cram_md5


def test_cram_md5_digest_checked_in_the_chain(client):
    from ofmipd.auth import cram_md5_digest

    chain = Chain([Plain("a", {}), Plain("b", {"bob": b"pw"})])
    challenge = b"<1.2@host>"
    good = cram_md5_digest(Secret(b"pw"), challenge)
    assert (
        run(chain.authenticate_cram_md5(b"bob", challenge, good, client)).verdict is Verdict.ACCEPT
    )
    bad = cram_md5_digest(Secret(b"pX"), challenge)
    assert (
        run(chain.authenticate_cram_md5(b"bob", challenge, bad, client)).verdict is Verdict.REJECT
    )


class Lookup(Fixed):
    """A plaintext source that answers every lookup with `answer`."""

    def __init__(self, name, answer):
        super().__init__(name)
        self.answer = answer

    async def lookup_plaintext(self, user, client):
        return self.answer


def test_cram_md5_lookups_found_not_found_and_outage(client):
    from ofmipd.auth import cram_md5_digest

    challenge = b"<1.2@host>"
    good = cram_md5_digest(Secret(b"pw"), challenge)
    found = Lookup("found", Found(Secret(b"pw"), "Bob"))
    decision = run(Chain([found]).authenticate_cram_md5(b"bob", challenge, good, client))
    assert (decision.verdict, decision.user) == (Verdict.ACCEPT, "Bob")  # the store's name
    down = Lookup("down", tempfail("ldap server down"))
    unknown = Lookup("unknown", reject("no such user"))
    decision = run(Chain([unknown, down]).authenticate_cram_md5(b"bob", challenge, good, client))
    assert (decision.verdict, decision.reason) == (Verdict.TEMPFAIL, "ldap server down")
    # "Found" needs the password: an ACCEPT without one is the store's bug, not a login.
    bogus = Lookup("bogus", accept("found", "bob"))
    decision = run(Chain([bogus]).authenticate_cram_md5(b"bob", challenge, good, client))
    assert decision.verdict is Verdict.TEMPFAIL
    assert decision.reason == "plaintext lookup accepted without a password"


def test_cram_md5_with_a_backend_that_cannot_look_up_is_tempfail(client):
    decision = run(Chain([Fixed("a", accept())]).authenticate_cram_md5(b"u", b"c", "d", client))
    assert decision.verdict is Verdict.TEMPFAIL
    assert decision.reason == "cannot look up a plaintext password for CRAM-MD5"


class Offloaded(Fixed):
    """A blocking backend in a one-worker offload whose queue may wait 50 ms."""

    def __init__(self, name):
        import threading

        from ofmipd.offload import Offload

        super().__init__(name)
        self.offload = Offload(name, workers=1, max_queue_age=0.05)
        self.started, self.release = threading.Event(), threading.Event()

    async def verify(self, user, secret, client):
        return await self.offload.run(self._blocking)

    def _blocking(self):
        self.started.set()
        self.release.wait(5)
        return accept()


def test_a_full_offload_queue_is_tempfail_naming_the_queue(client):
    backend = Offloaded("slow")

    async def main():
        chain = Chain([backend])
        first = asyncio.create_task(chain.authenticate(b"u", b"p", client))
        await asyncio.to_thread(backend.started.wait, 5)  # the one worker is busy
        second = await chain.authenticate(b"u", b"p", client)
        backend.release.set()
        return await first, second

    try:
        first, second = run(main())
    finally:
        backend.release.set()
        backend.offload.close()
    assert first.verdict is Verdict.ACCEPT
    assert (second.verdict, second.reason) == (
        Verdict.TEMPFAIL,
        "slow: all 1 workers busy for 0.05s",
    )


def test_verdict_has_no_truth_value():
    with pytest.raises(TypeError):
        bool(Verdict.TEMPFAIL)


def test_secret_repr_hides_the_password():
    assert "hunter2" not in repr(Secret(b"hunter2")) + str(Secret(b"hunter2"))
