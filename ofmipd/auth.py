"""The seam between SMTP and credential stores: verdicts, secrets and the chain.

No I/O happens here. Backends (auth_backends/) answer with an Outcome; the Chain
asks them in order and returns a Decision that the SMTP layer, the logs and
ofmipd-authtest all read.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

from ofmipd.offload import QueueTimeout

if TYPE_CHECKING:
    from ofmipd.identity import ClientIdentity
    from ofmipd.store import Store

log = logging.getLogger("ofmipd.auth")


class Verdict(enum.Enum):
    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"

    def __bool__(self) -> bool:
        # A verdict is three-way; "if verdict:" would silently treat TEMPFAIL as yes.
        raise TypeError("compare a Verdict with Verdict.ACCEPT, not by truth value")


class Secret:
    """A password as bytes whose repr never shows it."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def matches(self, other: bytes) -> bool:
        return hmac.compare_digest(self._value, other)

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return "Secret(<redacted>)"

    __str__ = __repr__


# Records here and elsewhere on the one-session path are NamedTuples, not dataclasses:
# defining a frozen dataclass costs ~1 ms, paid again by every `ofmipd -1` process.
class Outcome(NamedTuple):
    """What one backend says. `reason` is for the admin and never holds a secret."""

    verdict: Verdict
    reason: str
    user: str | None = None  # the canonical name, when the store knows it


def accept(reason: str = "password matches", user: str | None = None) -> Outcome:
    return Outcome(Verdict.ACCEPT, reason, user)


def reject(reason: str) -> Outcome:
    return Outcome(Verdict.REJECT, reason)


def tempfail(reason: str) -> Outcome:
    return Outcome(Verdict.TEMPFAIL, reason)


class Found(NamedTuple):
    """A plaintext lookup that found the user. Not found is an Outcome saying why:
    REJECT for an unknown user, TEMPFAIL when the store could not answer."""

    secret: Secret
    user: str | None = None  # the canonical name, when the store knows it


@runtime_checkable
class Authenticator(Protocol):
    name: str  # the kind, e.g. "ldap"
    target: str  # what it talks to, for logs and ofmipd-authtest

    async def verify(self, user: str, secret: Secret, client: ClientIdentity) -> Outcome: ...


@runtime_checkable
class PlaintextSource(Protocol):
    """Optional second capability; CRAM-MD5 is offered only if every backend has it."""

    async def lookup_plaintext(self, user: str, client: ClientIdentity) -> Found | Outcome: ...


def can_lookup_plaintext(backend: object) -> bool:
    return isinstance(backend, PlaintextSource)


class ScramKeys(NamedTuple):  # RFC 5802 stored credentials for one hash
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes
    label: str | None  # an app password's label, None for the main one
    user: str | None = None  # the store's canonical name for the user
    # Why this credential may not log this client in (scope, expiry, mechanisms=, nologin),
    # None if it may. Out-of-scope keys still take part, so that a right proof is told
    # apart from a wrong one in the log, as for PLAIN.
    refusal: str | None = None


@runtime_checkable
class ScramSource(Protocol):
    """Optional capability; SCRAM-* is offered only if every backend has it."""

    async def scram_keys(
        self, user: str, mechanism: str, client: ClientIdentity
    ) -> list[ScramKeys] | Outcome: ...

    # mechanism e.g. "SCRAM-SHA-256-PLUS"; REJECT Outcome for an unknown user


@runtime_checkable
class UseRecorder(Protocol):
    """Optional: a store that keeps when and from where each app password was last used.
    Its verify() knows which line accepted; for SCRAM only the exchange does, so the
    chain tells it."""

    async def record_use(self, user: str, label: str, client: ClientIdentity) -> None: ...


# The SCRAM exchange with the client, given the credentials a proof may match (empty:
# nobody knows the user, so the exchange runs against keys no password matches). It
# answers with the outcome and the credential the proof matched, if any.
Prove = Callable[[Sequence[ScramKeys]], Awaitable[tuple[Outcome, ScramKeys | None]]]


def scram_candidates(keys: Sequence[ScramKeys]) -> list[ScramKeys]:
    """The credentials one SCRAM exchange can check, the one whose salt is sent first.

    The server-first message names one salt and iteration count before the client proves
    anything, so the exchange commits to one credential: the first that this client may
    use (the main password before app passwords, else file order), or when none may, the
    first (so that a right password is told "out of scope" rather than "mismatch"). A
    proof is then checked against every credential with that same salt and count, those
    in scope first: that is how several app passwords of one user all work with SCRAM
    (ofmipd-passwd gives a user's SCRAM lines one salt).
    """
    ordered = sorted(keys, key=lambda k: (k.refusal is not None, k.label is not None))
    first = ordered[0]
    return [k for k in ordered if (k.salt, k.iterations) == (first.salt, first.iterations)]


# One question the chain puts to each backend in turn: verify, or look up for CRAM-MD5.
Ask = Callable[[Authenticator], Awaitable[Outcome]]


class Attempt(NamedTuple):
    backend: str
    target: str
    outcome: Outcome
    ms: float


class Decision(NamedTuple):
    verdict: Verdict
    user: str | None  # ACCEPT: the store's canonical name; otherwise the name as given
    attempts: tuple[Attempt, ...]

    @property
    def decided_by(self) -> Attempt | None:
        """The attempt the verdict rests on: the first accept, for TEMPFAIL the first
        backend that could not answer (not the last one asked, which may have said no),
        for REJECT the last backend asked."""
        if self.verdict is not Verdict.REJECT:
            for attempt in self.attempts:
                if attempt.outcome.verdict is self.verdict:
                    return attempt
        return self.attempts[-1] if self.attempts else None

    @property
    def reason(self) -> str:
        decider = self.decided_by
        return decider.outcome.reason if decider else "no backend tried"


MAX_USER_BYTES = 256  # longer than any real login; bounds what reaches logs and stores
# Besides C0, DEL and C1 (NEL among them), these end a line for some log readers.
_LINE_SEPARATORS = ("\u2028", "\u2029")


def malformed_name(name: str) -> str | None:
    """Why `name` cannot be a user name, or None if it can.

    Refused: control characters (C0, DEL, C1, U+2028/U+2029), leading or trailing
    whitespace (Unicode's too) and more than MAX_USER_BYTES bytes of UTF-8. A store that
    ignores them (LDAP's matching rules drop spaces and fold case) would otherwise let
    "alice " log in as alice while the session and every policy keyed on the name saw
    someone else.
    """
    if not name:
        return "empty user name"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_USER_BYTES:
        return f"user name longer than {MAX_USER_BYTES} bytes"
    # isprintable() is False for every control character: the common case costs one call.
    if not name.isprintable() and any(
        ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F or c in _LINE_SEPARATORS for c in name
    ):
        return "control character in user name"
    if name.strip() != name:
        return "leading or trailing whitespace in user name"
    return None


def check_at_the_door(user: bytes, password: bytes) -> str | Outcome:
    """Validate raw credentials once, before any rate limit, log line or backend."""
    if not user:
        return reject("malformed credentials: empty user name")
    if len(user) > MAX_USER_BYTES:
        return reject(f"malformed credentials: user name longer than {MAX_USER_BYTES} bytes")
    if not password:
        return reject("malformed credentials: empty password")
    if b"\0" in password:
        return reject("malformed credentials: NUL in password")
    try:
        name = user.decode("utf-8")
    except UnicodeDecodeError:
        return reject("malformed credentials: user name is not UTF-8")
    why = malformed_name(name)
    return reject(f"malformed credentials: {why}") if why else name


def refused_at_the_door(outcome: Outcome) -> Decision:
    return Decision(Verdict.REJECT, None, (Attempt("door", "-", outcome, 0.0),))


def cram_md5_digest(secret: Secret, challenge: bytes) -> str:
    return hmac.new(secret.reveal(), challenge, hashlib.md5).hexdigest()


class Chain:
    """Asks backends in order; the first accept wins.

    If nobody accepted and any backend failed temporarily the verdict is TEMPFAIL:
    that backend might have said yes, so the client must try later, not be told
    its password is wrong.
    """

    def __init__(self, backends: Sequence[Authenticator], timeout: float = 30.0) -> None:
        self.backends = tuple(backends)
        self.timeout = timeout
        self.store: Store | None = None  # the embedded store, for SCRAM's salts

    @property
    def supports_cram_md5(self) -> bool:
        return bool(self.backends) and all(can_lookup_plaintext(b) for b in self.backends)

    @property
    def supports_scram(self) -> bool:
        return bool(self.backends) and all(isinstance(b, ScramSource) for b in self.backends)

    async def authenticate(
        self, user: bytes, password: bytes, client: ClientIdentity, *, try_all: bool = False
    ) -> Decision:
        name = check_at_the_door(user, password)
        if isinstance(name, Outcome):
            return refused_at_the_door(name)
        secret = Secret(password)
        return await self._ask_each(name, lambda b: b.verify(name, secret, client), try_all=try_all)

    async def authenticate_cram_md5(
        self, user: bytes, challenge: bytes, digest: str, client: ClientIdentity
    ) -> Decision:
        name = check_at_the_door(user, b"-")  # CRAM-MD5 sends no password
        if isinstance(name, Outcome):
            return refused_at_the_door(name)

        async def by_digest(backend: Authenticator) -> Outcome:
            if not isinstance(backend, PlaintextSource):  # CRAM-MD5 is not offered then
                return tempfail("cannot look up a plaintext password for CRAM-MD5")
            found = await backend.lookup_plaintext(name, client)
            if isinstance(found, Outcome):
                if found.verdict is Verdict.ACCEPT:  # "found" needs the password with it
                    return tempfail("plaintext lookup accepted without a password")
                return found
            expected = cram_md5_digest(found.secret, challenge)
            if hmac.compare_digest(expected.encode(), digest.lower().encode()):
                return accept("CRAM-MD5 digest matches", found.user)
            return reject("CRAM-MD5 digest mismatch")

        return await self._ask_each(name, by_digest, try_all=False)

    async def authenticate_scram(
        self, user: bytes, mechanism: str, client: ClientIdentity, prove: Prove
    ) -> Decision:
        """The first backend that knows the user hands over its keys; the client's
        proof against them decides (a later backend cannot be tried: the salt is sent).
        `prove` talks to the client, so it runs outside the per-backend timeout."""
        name = check_at_the_door(user, b"-")  # SCRAM sends no password
        if isinstance(name, Outcome):
            return refused_at_the_door(name)
        from ofmipd.scram_salts import load_pepper

        await load_pepper(self.store)  # before any salt is derived or faked
        found: list[ScramKeys] = []

        async def lookup(backend: Authenticator) -> Outcome:
            if not isinstance(backend, ScramSource):  # SCRAM is not offered then
                return tempfail("cannot hand over SCRAM keys")
            keys = await backend.scram_keys(name, mechanism, client)
            if isinstance(keys, Outcome):
                if keys.verdict is Verdict.ACCEPT:  # "found" needs the keys with it
                    return tempfail("SCRAM key lookup accepted without keys")
                return keys
            if not keys:
                return reject(f"no {mechanism} credentials for {name}")
            found.extend(keys)
            return accept("SCRAM keys found")

        attempts: list[Attempt] = []
        for backend in self.backends:
            started = time.perf_counter()
            outcome = await self._contained(backend, lookup)
            ms = (time.perf_counter() - started) * 1000
            if outcome.verdict is Verdict.ACCEPT:
                outcome, matched = await prove(scram_candidates(found))
                outcome = self._usable(outcome)  # the name comes with the keys
                attempts.append(Attempt(backend.name, backend.target, outcome, ms))
                if outcome.verdict is Verdict.ACCEPT and matched and matched.label:
                    await self._record_use(backend, outcome.user or name, matched.label, client)
                return self._decision(name, attempts)
            attempts.append(Attempt(backend.name, backend.target, outcome, ms))
        if not any(a.outcome.verdict is Verdict.TEMPFAIL for a in attempts):
            await prove(())  # an unknown user costs the client the same round trips
        return self._decision(name, attempts)

    @staticmethod
    async def _record_use(
        backend: Authenticator, user: str, label: str, client: ClientIdentity
    ) -> None:
        if not isinstance(backend, UseRecorder):
            return
        try:
            await backend.record_use(user, label, client)
        except Exception:  # contained: a login does not fail for want of a footnote
            log.error("backend %s could not record a use", backend.name, exc_info=True)

    async def _ask_each(self, name: str, ask: Ask, *, try_all: bool) -> Decision:
        attempts: list[Attempt] = []
        for backend in self.backends:
            started = time.perf_counter()
            outcome = await self._contained(backend, ask)
            ms = (time.perf_counter() - started) * 1000
            attempts.append(Attempt(backend.name, backend.target, outcome, ms))
            if outcome.verdict is Verdict.ACCEPT and not try_all:
                break
        return self._decision(name, attempts)

    @staticmethod
    def _decision(name: str, attempts: list[Attempt]) -> Decision:
        winner = next((a.outcome for a in attempts if a.outcome.verdict is Verdict.ACCEPT), None)
        if winner is not None:
            # A store that cannot canonicalise (checkpassword, IMAP, POP3) leaves the name as
            # given, which the door has already checked.
            return Decision(Verdict.ACCEPT, winner.user or name, tuple(attempts))
        if any(a.outcome.verdict is Verdict.TEMPFAIL for a in attempts):
            return Decision(Verdict.TEMPFAIL, name, tuple(attempts))
        return Decision(Verdict.REJECT, name, tuple(attempts))

    async def _contained(self, backend: Authenticator, ask: Ask) -> Outcome:
        try:
            outcome = await asyncio.wait_for(ask(backend), self.timeout)
        except QueueTimeout as error:  # the backend's offload: all its workers stayed busy
            return tempfail(str(error))
        except TimeoutError:
            return tempfail(f"no answer within {self.timeout:g}s")
        except Exception as error:  # contained: one broken backend must not kill the session
            log.error("backend %s raised", backend.name, exc_info=True)
            return tempfail(f"internal error: {type(error).__name__}")
        if not isinstance(outcome, Outcome):
            return tempfail(f"backend returned {type(outcome).__name__}, not an Outcome")
        return Chain._usable(outcome)

    @staticmethod
    def _usable(outcome: Outcome) -> Outcome:
        if outcome.verdict is Verdict.ACCEPT and outcome.user is not None:
            # The store's name becomes the session's identity (sender map, LOGIN, logs):
            # it must meet the rules the client's name had to meet at the door.
            why = malformed_name(outcome.user) if isinstance(outcome.user, str) else "not text"
            if why:
                return tempfail(f"accepted, but its canonical name is unusable: {why}")
        return outcome
