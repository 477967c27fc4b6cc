"""Helpers for the guessing-limit tests: chain decisions, and one AUTH through a limiter."""

from __future__ import annotations

from ofmipd.auth import Attempt, Decision, Verdict, accept, reject, tempfail
from ofmipd.ratelimit import LoginLimiter, Refusal, Ticket


def rejected(user: str = "alice") -> Decision:
    attempt = Attempt("authfile", "users", reject("password mismatch"), 0.1)
    return Decision(Verdict.REJECT, user, (attempt,))


def accepted(user: str = "alice") -> Decision:
    return Decision(Verdict.ACCEPT, user, (Attempt("authfile", "users", accept(), 0.1),))


def tempfailed(user: str = "alice") -> Decision:
    attempt = Attempt("imap", "127.0.0.1:1", tempfail("connection refused"), 0.1)
    return Decision(Verdict.TEMPFAIL, user, (attempt,))


def partly_rejected(user: str = "alice") -> Decision:
    """The authfile said no while the IMAP server could not be asked (issue 12, section 9)."""
    return Decision(
        Verdict.TEMPFAIL,
        user,
        (
            Attempt("authfile", "users", reject("password mismatch"), 0.1),
            Attempt("imap", "127.0.0.1:1", tempfail("connection refused"), 0.1),
        ),
    )


def malformed() -> Decision:
    attempt = Attempt("door", "-", reject("malformed credentials: NUL in password"), 0.0)
    return Decision(Verdict.REJECT, None, (attempt,))


async def auth(
    limiter: LoginLimiter, ip: str | None, user: str | None, decision: Decision | None = None
) -> tuple[Refusal | None, Refusal | None]:
    """One AUTH as the SMTP layer does it: (refused before the chain, lock-out started)."""
    ticket = await limiter.begin(ip, user)
    if isinstance(ticket, Refusal):
        return ticket, None
    assert isinstance(ticket, Ticket)
    return None, await limiter.settle(ticket, decision or rejected(user or "-"))
