"""Configuration to live objects: the only construction path.

The daemon, one-session mode, --check-config and ofmipd-authtest all call
build_app(), so what the admin tests is what the server runs.
"""

from __future__ import annotations

import itertools
import os
import socket
import ssl
from typing import Any

import auth_backends
from ofmipd.auth import Chain, Decision
from ofmipd.config import Config
from ofmipd.delivery import Delivery, MaildirTarget, SendmailTarget, Target
from ofmipd.errors import ConfigError
from ofmipd.logs import redact_url


def default_hostname() -> str:
    # Worked out once at start-up; never a DNS lookup per connection.
    name = socket.gethostname()
    if "." not in name:
        try:
            fqdn = socket.getfqdn(name)
        except OSError:
            fqdn = name
        if "." in fqdn and not fqdn.startswith("localhost"):
            name = fqdn
    return name


class Metrics:
    """The metrics facade the SMTP layer calls, as this no-op unless --metrics is given
    (then ofmipd.metrics.PrometheusMetrics). It lives here, not in ofmipd.metrics, so a
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

    def start(self, host: str, port: int) -> None:
        pass

    def stop(self) -> None:
        pass


class App:
    """Everything a session needs. build_app() fills in the optional parts after creation.

    A plain class rather than a dataclass: defining a dataclass costs about a millisecond,
    which every `ofmipd -1` process would pay."""

    __slots__ = (
        "config", "hostname", "chain", "delivery", "mechanisms", "starttls_context",
        "implicit_tls_context", "rules", "proxy_trust", "proxy_timeout", "senders", "limiter",
        "metrics", "reverse_names", "instance_id", "sessions_started", "_handler",
        "tls_terminators",
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
        rules: Any | None = None,
        proxy_trust: Any | None = None,
        proxy_timeout: float = 10.0,
        senders: Any | None = None,
        limiter: Any | None = None,
        metrics: Any = None,
        reverse_names: Any | None = None,
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
        self.metrics: Any = metrics if metrics is not None else Metrics()
        self.reverse_names = reverse_names
        # Unique in the logs: a random prefix per App (process or reload), then a counter.
        self.instance_id = os.urandom(2).hex()
        self.sessions_started = itertools.count(1)
        self._handler: Any = None
        self.tls_terminators: Any | None = None  # --tls-in-front peers (identity.Networks)

    def new_session_id(self) -> str:
        return f"{self.instance_id}{next(self.sessions_started):x}"

    @property
    def handler(self) -> Any:
        if self._handler is None:
            from ofmipd.smtp import SubmissionHandler

            self._handler = SubmissionHandler(self)
        return self._handler

    def describe(self) -> str:
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
        lines.append("authenticators (in order):")
        for number, backend in enumerate(self.chain.backends, 1):
            lines.append(f"  {number}. {backend.name} {backend.target}")
        lines.append(
            f"delivery: {self.delivery.target.name} {describe_target(self.delivery.target)}"
        )
        if self.limiter is not None:
            lines.append(f"login rate limit: {self.limiter.describe()}")
        else:
            lines.append("login rate limit: off (--ratelimit off)")
        if config.throttle_script:
            lines.append(f"throttle script: {config.throttle_script}")
        # Backends build their targets without passwords; this is the net for the rest
        # (the rate-limit store's Redis URL, a URL in a checkpassword command line).
        return redact_url("\n".join(lines))


def describe_target(target: Target) -> str:
    if isinstance(target, MaildirTarget):
        return target.path
    if isinstance(target, SendmailTarget):
        return " ".join(target.argv)
    return ""


def build_chain(config: Config) -> Chain:
    return Chain([auth_backends.create(spec) for spec in config.auth], timeout=config.auth_timeout)


def build_delivery(config: Config) -> Delivery:
    target: Target
    if config.maildir:
        owner = None
        if config.username and os.geteuid() == 0:
            from ofmipd.privileges import lookup

            user = lookup(config.username)  # the Maildir is theirs: they deliver into it
            owner = (user.uid, user.gid)
        try:
            target = MaildirTarget(config.maildir, owner)
        except OSError as error:
            named = error.filename not in (None, os.path.abspath(config.maildir))
            where = f"{error.filename}: " if named else ""
            raise ConfigError(f"--maildir {config.maildir}: {where}{error.strerror}") from None
    else:
        program = config.sendmail_program
        target = SendmailTarget(program, config.delivery_timeout)
        executable = target.argv[0] if target.argv else ""
        if not (os.path.isfile(executable) and os.access(executable, os.X_OK)):
            raise ConfigError(f"sendmail program {executable!r} is not an executable file")
    if config.throttle_script and not os.access(config.throttle_script, os.X_OK):
        raise ConfigError(f"--throttle-script {config.throttle_script}: not executable")
    return Delivery(target, config.throttle_script, config.delivery_timeout)


def build_rules(config: Config) -> Any | None:
    if not config.rules and not config.rule_tables:
        return None
    from ofmipd.rules import Rules

    if config.rules:
        return Rules.from_file(config.rules)
    return Rules.from_config(list(config.rule_tables), config.source)


def build_limiter(config: Config) -> Any | None:
    """Guessing limits, on unless --ratelimit off (the SQLite store by default)."""
    if config.ratelimit is not None and config.ratelimit.strip().lower() in ("off", "none"):
        return None
    from ofmipd.ratelimit import parse_ratelimit

    options = {"fail_open": config.ratelimit_fail_open, **dict(config.ratelimit_options)}
    # A reservation must outlive the slowest chain, or more guesses would run at once.
    hold = config.auth_timeout * max(1, len(config.auth)) + 10
    return parse_ratelimit(
        config.ratelimit,
        options,
        state_dir=config.state_dir,
        username=config.username,
        hold=hold,
    )


def build_app(config: Config, previous: App | None = None) -> App:
    """`previous` is the running App on a reload: its rate-limit state and metrics
    endpoint carry over, so a SIGHUP neither forgets failures nor rebinds a port."""
    chain = build_chain(config)
    mechanisms = ("PLAIN", "LOGIN") + (("CRAM-MD5",) if chain.supports_cram_md5 else ())
    app = App(
        config=config,
        hostname=config.hostname or default_hostname(),
        chain=chain,
        delivery=build_delivery(config),
        mechanisms=mechanisms,
    )
    if config.ssl or config.tls:
        from ofmipd.tls import server_context

        context = server_context(config.ssl_cert, config.ssl_key, config.ciphers)
        if config.ssl:
            app.implicit_tls_context = context
        else:
            app.starttls_context = context
    app.rules = build_rules(config)
    if config.reverse_dns:
        from ofmipd.rdns import ReverseNames

        app.reverse_names = (previous and previous.reverse_names) or ReverseNames()

    def limits(c: Config) -> tuple[Any, ...]:
        return (c.ratelimit, c.ratelimit_options, c.ratelimit_fail_open, c.state_dir)

    same_limits = previous is not None and limits(previous.config) == limits(config)
    if previous is not None and same_limits:
        app.limiter = previous.limiter
    else:
        app.limiter = build_limiter(config)
    if previous is not None:
        app.metrics = previous.metrics
    if config.sender_map:
        from ofmipd.senders import SenderMap

        app.senders = SenderMap.from_file(config.sender_map)
    if config.proxy_protocol:
        from ofmipd.proxy import TrustedProxies

        app.proxy_trust = TrustedProxies.parse(",".join(config.proxy_protocol))
    if config.tls_in_front:
        from ofmipd.identity import Networks

        app.tls_terminators = Networks.parse(config.tls_in_front, option="--tls-in-front")
    return app
