"""The SMTP AUTH exchange: from the AUTH command to its 235, 535 or 454.

It reads the credentials (the mechanisms' challenges and responses), checks them at
the door, asks the password-guessing limiter for a guess, asks the Chain, logs the
decision in one line that fail2ban can match, and answers. The session only calls
`run`; no backend or SMTP code learns about the other.
"""

from __future__ import annotations

import asyncio
import logging
from base64 import b64encode
from typing import TYPE_CHECKING, NamedTuple

from ofmipd import mechanisms
from ofmipd.auth import Decision, Outcome, Verdict, check_at_the_door, refused_at_the_door
from ofmipd.logs import printable
from ofmipd.ratelimit import LoginLimiter, Refusal, Ticket, partial_reject
from ofmipd.replies import (
    REPLY_AUTH_BAD,
    REPLY_AUTH_OK,
    REPLY_AUTH_TEMP,
    REPLY_BUSY,
    REPLY_NEED_TLS,
    REPLY_TOO_MANY,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ofmipd.auth import ScramKeys
    from ofmipd.scram import ScramExchange
    from ofmipd.smtp import SubmissionProtocol

authlog = logging.getLogger("ofmipd.auth")

_REPLIES = {Verdict.ACCEPT: REPLY_AUTH_OK, Verdict.TEMPFAIL: REPLY_AUTH_TEMP}


class ExchangeEnded(Exception):
    """The client cancelled or left mid-exchange; any reply has been sent."""


class Credentials(NamedTuple):
    """What the client sent: a password, a CRAM-MD5 challenge and digest, or the start
    of a SCRAM exchange (which goes on while the Chain decides)."""

    user: bytes
    password: bytes = b""
    challenge: bytes = b""
    digest: str = ""
    scram: ScramExchange | None = None

    def __repr__(self) -> str:
        return f"Credentials(user={self.user!r}, <redacted>)"

    def at_the_door(self) -> str | Outcome:
        """The user name if the credentials are well-formed, else the door's REJECT."""
        sends_no_password = self.digest or self.scram is not None
        return check_at_the_door(self.user, b"-" if sends_no_password else self.password)

    async def check(self, protocol: SubmissionProtocol) -> Decision:
        chain, client = protocol.app.chain, protocol.client
        scram = self.scram
        if scram is not None:

            async def ask(challenge: bytes) -> bytes:
                answer = await _response(protocol, challenge, None)
                if answer is None:
                    raise ExchangeEnded
                return answer

            async def prove(candidates: Sequence[ScramKeys]) -> tuple[Outcome, ScramKeys | None]:
                return await scram.prove(candidates, ask)

            return await chain.authenticate_scram(self.user, scram.mechanism, client, prove)
        if self.digest:
            return await chain.authenticate_cram_md5(self.user, self.challenge, self.digest, client)
        return await chain.authenticate(self.user, self.password, client)


async def run(protocol: SubmissionProtocol, arg: str | None) -> None:
    """AUTH <mechanism> [initial-response], to the end of the exchange."""
    request = _request(protocol, arg)
    if isinstance(request, str):
        await protocol.push(request)
        return
    mechanism, initial = request
    protocol.redact_replies = mechanism.startswith("SCRAM-")
    try:
        await _run(protocol, mechanism, initial)
    finally:
        protocol.redact_replies = False


async def _run(protocol: SubmissionProtocol, mechanism: str, initial: bytes | None) -> None:
    try:
        credentials = await _read_credentials(protocol, mechanism, initial)
    except mechanisms.MalformedResponse as error:
        await protocol.push(str(error))
        return
    if credentials is None:  # the client cancelled, or a reply was already sent
        return
    try:
        decision = await _decide(protocol, mechanism, credentials)
    except ExchangeEnded:
        return
    if decision is None:  # the limiter refused; the reply is out
        return
    reply = _REPLIES.get(decision.verdict, REPLY_AUTH_BAD)
    if decision.verdict is Verdict.ACCEPT:
        protocol.authenticated(decision, mechanism)
        if credentials.scram is not None and credentials.scram.server_final:
            # RFC 4954's "additional data with success": the server-final in the 235, as
            # its whole text (no enhanced status code: a client decodes all of it).
            reply = f"235 {b64encode(credentials.scram.server_final).decode()}"
            protocol._plain_replies = True
    try:
        await protocol.push(reply)
    finally:
        protocol._plain_replies = False


def _request(protocol: SubmissionProtocol, arg: str | None) -> str | tuple[str, bytes | None]:
    """The mechanism and initial response asked for, or the reply refusing the command."""
    session = protocol.session_state
    if not session.host_name or not session.extended_smtp:
        return "503 5.5.1 Send EHLO first"
    if not protocol.auth_allowed_now():
        return REPLY_NEED_TLS
    if session.authenticated:
        return "503 5.5.1 Already authenticated"
    words = (arg or "").split()
    if not words or len(words) > 2:
        return "501 5.5.4 Syntax: AUTH mechanism [initial-response]"
    mechanism = words[0].upper()
    if mechanism not in protocol.offered_mechanisms():
        return "504 5.5.4 Unrecognized authentication mechanism"
    return mechanism, words[1].encode("ascii", "replace") if len(words) == 2 else None


async def _decide(
    protocol: SubmissionProtocol, mechanism: str, credentials: Credentials
) -> Decision | None:
    """The Chain's decision, logged and counted; None if the limiter refused the guess."""
    app = protocol.app
    # The door comes first: a malformed name reaches no per-user key, backend or log
    # line but the one (escaped) that says it was refused; it counts against the address.
    door = credentials.at_the_door()
    name = None if isinstance(door, Outcome) else door
    limiter = app.limiter
    ticket = None
    if limiter is not None:  # reserve a guess before any backend runs
        reserved = await limiter.begin(protocol.client.ip, name)
        if isinstance(reserved, Refusal):
            await _refused(protocol, limiter, reserved, name)
            return None
        ticket = reserved
    if isinstance(door, Outcome):
        decision = refused_at_the_door(door)
    else:
        try:
            decision = await credentials.check(protocol)
        except BaseException:
            if limiter is not None and ticket is not None:
                limiter.abandon(ticket)  # the session ended mid-chain: give the guess back
            raise
    _log_decision(protocol, mechanism, decision, credentials.user)
    app.metrics.auth(mechanism, decision)
    if limiter is not None and ticket is not None:
        await _settle(protocol, limiter, ticket, decision, name)
    return decision


async def _settle(
    protocol: SubmissionProtocol,
    limiter: LoginLimiter,
    ticket: Ticket,
    decision: Decision,
    name: str | None,
) -> None:
    """Count the guess (or give it back); a counted one waits out the failure delay."""
    lockout = await limiter.settle(ticket, decision)
    if lockout is not None:
        protocol.app.metrics.ratelimit_lockout(lockout.key)
        authlog.warning(
            "lockout started: client=%s user=%s reason=%r session=%s",
            protocol.client.ip or "unknown",
            printable(name or "-"),
            lockout.reason,
            protocol.session_id,
        )
    if decision.verdict is Verdict.REJECT or partial_reject(decision):
        await limiter.failure_delay()


async def _refused(
    protocol: SubmissionProtocol, limiter: LoginLimiter, refusal: Refusal, user: str | None
) -> None:
    """Password-guessing lock-out: refuse without asking any backend."""
    authlog.warning(
        "auth refused: client=%s user=%s reason=%r session=%s",
        protocol.client.ip or "unknown",
        printable(user or "-"),
        refusal.reason,
        protocol.session_id,
    )
    protocol.app.metrics.ratelimit_refused(refusal.key)
    await limiter.failure_delay()
    await protocol.push(REPLY_BUSY if refusal.key == "busy" else REPLY_TOO_MANY)


async def _read_credentials(
    protocol: SubmissionProtocol, mechanism: str, initial: bytes | None
) -> Credentials | None:
    if mechanism == "PLAIN":
        blob = await _response(protocol, b"", initial)
        if blob is None:
            return None
        creds = mechanisms.parse_plain(blob)
        return Credentials(creds.user, creds.password)
    if mechanism == "LOGIN":
        user = await _response(protocol, mechanisms.LOGIN_USERNAME_CHALLENGE, initial)
        if user is None:
            return None
        password = await _response(protocol, mechanisms.LOGIN_PASSWORD_CHALLENGE, None)
        if password is None:
            return None
        return Credentials(user, password)
    if mechanism == "CRAM-MD5":
        if initial is not None:
            await protocol.push("501 5.5.4 CRAM-MD5 takes no initial response")
            return None
        challenge = mechanisms.cram_md5_challenge(protocol.hostname)
        blob = await _response(protocol, challenge, None)
        if blob is None:
            return None
        response = mechanisms.parse_cram_md5(blob)
        return Credentials(response.user, challenge=challenge, digest=response.digest)
    if mechanism.startswith("SCRAM-"):
        blob = await _response(protocol, b"", initial)
        if blob is None:
            return None
        first = mechanisms.parse_scram_first(blob)
        from ofmipd.scram import ScramExchange  # scramp: only for SCRAM logins

        binding = protocol.channel_binding() if protocol.plus_offered() else None
        final_in_235 = protocol.app.config.scram_final == "235"
        exchange = ScramExchange(
            mechanism, first.message, first.user.decode(), binding, final_in_235
        )
        return Credentials(first.user, scram=exchange)
    raise AssertionError(mechanism)


async def _response(
    protocol: SubmissionProtocol, challenge: bytes, initial: bytes | None
) -> bytes | None:
    """The client's decoded answer to a 334 challenge (or its initial response)."""
    if initial is not None:
        return mechanisms.decode_base64(initial)
    await protocol.push(b"334 " + b64encode(challenge))
    reader = protocol._reader
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        await _discard_long_line(reader)
        await protocol.push("500 5.5.6 Authentication exchange line is too long")
        return None
    except asyncio.IncompleteReadError:
        protocol._close()
        return None
    if len(line) > protocol.line_length_limit:
        await protocol.push("500 5.5.6 Authentication exchange line is too long")
        return None
    line = line.strip()
    if line == b"*":
        await protocol.push("501 5.7.0 Authentication cancelled")
        return None
    return mechanisms.decode_base64(line)


async def _discard_long_line(reader: asyncio.StreamReader) -> None:
    while True:
        try:
            await reader.readuntil(b"\n")
            return
        except asyncio.LimitOverrunError as overrun:
            await reader.read(overrun.consumed)


def _log_decision(
    protocol: SubmissionProtocol, mechanism: str, decision: Decision, typed: bytes
) -> None:
    # One line per attempt, in a form fail2ban can match: never a password. The name
    # and the reason (which can embed it) are escaped: one event, one line.
    decider = decision.decided_by
    verdict, reason = decision.verdict.value, decision.reason
    if partial_reject(decision):
        # 454 to the client, but a backend said no: a guess, logged as the reject it
        # is so that fail2ban counts it (an outage must not hide guessing).
        decider = next(a for a in decision.attempts if a.outcome.verdict is Verdict.REJECT)
        down = next(a for a in decision.attempts if a.outcome.verdict is Verdict.TEMPFAIL)
        verdict = "reject"
        reason = f"{decider.outcome.reason}; {down.backend} failed temporarily: " + (
            f"{down.outcome.reason}; answered 454"
        )
    authlog.log(
        logging.INFO if decision.verdict is Verdict.ACCEPT else logging.WARNING,
        "auth %s: client=%s user=%s mechanism=%s backend=%s reason='%s' ms=%.1f session=%s",
        verdict,
        protocol.client.ip or "unknown",
        printable(decision.user if decision.user is not None else typed) or "-",
        mechanism,
        decider.backend if decider else "-",
        printable(reason),
        sum(a.ms for a in decision.attempts),
        protocol.session_id,
    )
