"""The App: everything a session needs, built by ofmipd.assemble, read by every layer.

Loading it imports nothing of ofmipd (its types are for the checker), so the
SMTP layer, the listeners and the construction module can all depend on it without
depending on each other.
"""

from __future__ import annotations

import itertools
import os
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import ssl

    from ofmipd.auth import Chain, Decision
    from ofmipd.config import Config
    from ofmipd.delivery import Delivery, Target
    from ofmipd.identity import Networks
    from ofmipd.policy_client import PolicyClients
    from ofmipd.proxy import TrustedProxies
    from ofmipd.quota import Quotas
    from ofmipd.ratelimit import LoginLimiter
    from ofmipd.rdns import ReverseNames
    from ofmipd.relay import Relay
    from ofmipd.rules import Rules
    from ofmipd.senders import SenderMap


class Metrics(Protocol):
    """What the SMTP layer reports: NoMetrics, or ofmipd.metrics.PrometheusMetrics."""

    enabled: bool

    def session_started(self) -> None: ...
    def session_ended(self, result: str) -> None: ...
    def auth(self, mechanism: str, decision: Decision) -> None: ...
    def delivery(self, reply: str) -> None: ...
    def ratelimit_refused(self, key: str) -> None: ...
    def ratelimit_lockout(self, key: str) -> None: ...
    def quota_exceeded(self, kind: str) -> None: ...
    def policy_refused(self, state: str, reply: str) -> None: ...
    def start(self, host: str, port: int) -> None: ...
    def stop(self) -> None: ...


class NoMetrics:
    """Metrics unless --metrics is given. It lives here, not in ofmipd.metrics, so a
    process without metrics (every `ofmipd -1`) never imports that module."""

    enabled = False

    def session_started(self) -> None:
        pass

    def session_ended(self, result: str) -> None:
        pass

    def auth(self, mechanism: str, decision: Decision) -> None:
        pass

    def delivery(self, reply: str) -> None:
        pass

    def ratelimit_refused(self, key: str) -> None:
        pass

    def ratelimit_lockout(self, key: str) -> None:
        pass

    def quota_exceeded(self, kind: str) -> None:
        pass

    def policy_refused(self, state: str, reply: str) -> None:
        pass

    def start(self, host: str, port: int) -> None:
        pass

    def stop(self) -> None:
        pass


class App:
    """Everything a session needs. build_app() fills in the optional parts after creation.

    A plain class with __slots__, not a dataclass (see the note on records in ofmipd.auth)."""

    __slots__ = (
        "config", "hostname", "chain", "delivery", "mechanisms", "starttls_context",
        "implicit_tls_context", "rules", "proxy_trust", "proxy_timeout", "senders", "limiter",
        "metrics", "reverse_names", "instance_id", "sessions_started", "smtp_handler",
        "tls_terminators", "relay", "quotas", "policy_clients",
    )  # fmt: skip

    def __init__(
        self,
        config: Config,
        hostname: str,
        chain: Chain,
        delivery: Delivery,
        mechanisms: tuple[str, ...],
        starttls_context: ssl.SSLContext | None = None,
        implicit_tls_context: ssl.SSLContext | None = None,
        rules: Rules | None = None,
        proxy_trust: TrustedProxies | None = None,
        proxy_timeout: float = 10.0,
        senders: SenderMap | None = None,
        limiter: LoginLimiter | None = None,
        metrics: Metrics | None = None,
        reverse_names: ReverseNames | None = None,
    ) -> None:
        self.config = config
        self.hostname = hostname
        self.chain = chain
        self.delivery = delivery
        self.mechanisms = mechanisms
        self.starttls_context = starttls_context
        self.implicit_tls_context = implicit_tls_context
        self.rules = rules
        self.proxy_trust = proxy_trust
        self.proxy_timeout = proxy_timeout
        self.senders = senders
        self.limiter = limiter
        self.metrics: Metrics = metrics if metrics is not None else NoMetrics()
        self.reverse_names = reverse_names
        # Unique in the logs: a random prefix per App (process or reload), then a counter.
        self.instance_id = os.urandom(2).hex()
        self.sessions_started = itertools.count(1)
        # ofmipd.smtp's handler for this App, made by its first session (smtp.handler_for).
        self.smtp_handler: object = None
        self.tls_terminators: Networks | None = None  # --tls-in-front peers
        self.relay: Relay | None = None  # --relay: MAIL, RCPT and DATA go down through it
        self.quotas: Quotas | None = None  # --quota: checked at MAIL and RCPT
        self.policy_clients: PolicyClients | None = None  # --policy services

    def new_session_id(self) -> str:
        return f"{self.instance_id}{next(self.sessions_started):x}"

    def describe(self) -> str:
        from ofmipd.logs import redact_url

        config = self.config
        lines = [f"configuration: {config.source} (ok)", f"hostname: {self.hostname}"]
        if config.one_session:
            lines.append("mode: one session on stdin/stdout")
        else:
            lines.append(
                "listen: "
                + ", ".join(str(x) for x in config.listeners)
                + f" (connections {config.connections}"
                + (f" per worker, {config.workers} workers)" if config.workers > 1 else ")")
            )
        tls = (
            "implicit (--ssl)"
            if config.ssl
            else (f"STARTTLS {config.tls}" if config.tls else "off")
        )
        if self.tls_terminators is not None:
            tls += f", TLS terminated in front by {self.tls_terminators}"
        lines.append(f"tls: {tls}")
        limits = f"EHLO within {config.ehlo_timeout:g}s of connecting"
        if not config.one_session:
            limits = f"{config.per_ip_limit} sessions per client address, " + limits
        lines.append(f"connection limits: {limits}")
        lines.append(
            f"rules: {len(self.rules) if self.rules is not None else 0}"
            + (f" from {config.rules}" if config.rules else "")
            + (f" ({self.rules.order})" if self.rules is not None else "")
        )
        lines.append(f"mechanisms: {' '.join(self.mechanisms)}")
        lines.append(f"bare LF or CR in a message: {config.bare_newline}")
        fixups = [
            n for n, on in (("Message-ID", config.add_message_id), ("Date", config.add_date)) if on
        ]
        lines.append(f"fix-ups for logins (RFC 6409): {', '.join(fixups) or 'off'}")
        lines.append(f"header From check: {'on' if config.check_header_from else 'off'}")
        lines.append("authenticators (in order):")
        for number, backend in enumerate(self.chain.backends, 1):
            transport = getattr(backend, "transport", "")  # remote stores: how passwords go
            lines.append(
                f"  {number}. {backend.name} {backend.target}"
                + (f" ({transport})" if transport else "")
            )
        lines.append(
            f"delivery: {self.delivery.target.name} {describe_target(self.delivery.target)}"
        )
        if self.limiter is not None:
            lines.append(f"login rate limit: {self.limiter.describe()}")
        else:
            lines.append("login rate limit: off (--ratelimit off)")
        if self.quotas is not None:
            lines.extend(self.quotas.describe())
        else:
            lines.append("quotas: none")
        if config.throttle_script:
            lines.append(f"throttle script: {config.throttle_script}")
        if self.policy_clients is not None:
            lines.append("policy services (in order, first answer other than DUNNO decides):")
            lines.extend(self.policy_clients.describe())
        else:
            lines.append("policy services: none")
        # Backends build their targets without passwords; this is the net for the rest
        # (the rate-limit store's Redis URL, a URL in a checkpassword command line).
        return redact_url("\n".join(lines))


def describe_target(target: Target) -> str:
    from ofmipd.delivery import MaildirTarget, SendmailTarget

    if isinstance(target, MaildirTarget):
        return target.path
    if isinstance(target, SendmailTarget):
        return target.describe()
    describe = getattr(target, "describe", None)  # the relay's URL
    return describe() if callable(describe) else ""
