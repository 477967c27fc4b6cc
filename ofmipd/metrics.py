"""Optional Prometheus metrics (--metrics HOST:PORT): a facade the SMTP layer calls, no-op when off.

The no-op facade, NoMetrics, is defined in ofmipd.app, so a process without --metrics
(every `ofmipd -1`) never imports this module. prometheus-client is imported only when
metrics are configured. The exporter (ofmipd.metrics_server) serves prometheus_client's
WSGI app from a daemon thread with a bound on connections and a deadline for each:
scrapes never touch the event loop, and counters are thread-safe. Metrics use a
private registry, so a SIGHUP reload that keeps the same Metrics object keeps its counts.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

from ofmipd.app import Metrics, NoMetrics
from ofmipd.errors import ConfigError

if TYPE_CHECKING:
    from ofmipd.auth import Decision

# Label values come from small fixed sets, so a client cannot grow the label space.
SESSION_RESULTS = ("authenticated", "relay", "unauthenticated", "error", "timeout", "refused")
REFUSAL_KEYS = ("ip", "user", "store")


def delivery_result(reply: str) -> str:
    """250 / 4xx / 5xx (other) from an SMTP reply line."""
    code = reply[:3]
    if code == "250":
        return "250"
    if code[:1] in ("4", "5") and code.isdigit():
        return code[0] + "xx"
    return "other"


class PrometheusMetrics:
    """Metrics, as NoMetrics is: call sites need no `if`."""

    enabled = True

    def __init__(self) -> None:
        try:
            import prometheus_client as prom
        except ImportError as error:
            raise ConfigError(
                "--metrics needs the prometheus-client package (pip install prometheus-client)"
            ) from error
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.sessions = prom.Counter(
            "ofmipd_sessions", "SMTP sessions ended, by result", ["result"], registry=r
        )
        self.active = prom.Gauge("ofmipd_sessions_active", "SMTP sessions open now", registry=r)
        self.decisions = prom.Counter(
            "ofmipd_auth_decisions",
            "AUTH commands decided by the chain, by mechanism and verdict",
            ["mechanism", "verdict"],
            registry=r,
        )
        self.attempts = prom.Counter(
            "ofmipd_auth_attempts",
            "Answers of each backend in the chain, by backend and verdict",
            ["backend", "verdict"],
            registry=r,
        )
        self.latency = prom.Histogram(
            "ofmipd_auth_seconds",
            "Time a backend took to answer",
            ["backend"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.deliveries = prom.Counter(
            "ofmipd_deliveries", "Messages handed to delivery, by reply", ["result"], registry=r
        )
        self.refusals = prom.Counter(
            "ofmipd_ratelimit_refusals",
            "AUTH refused by the rate limiter without asking a backend, by key",
            ["key"],
            registry=r,
        )
        self.lockouts = prom.Counter(
            "ofmipd_ratelimit_lockouts", "Lockouts started, by key", ["key"], registry=r
        )
        self.quotas = prom.Counter(
            "ofmipd_quota_exceeded",
            "MAIL or RCPT refused over a sending quota, by quota kind",
            ["quota"],
            registry=r,
        )
        self.policy = prom.Counter(
            "ofmipd_policy_refusals",
            "MAIL, RCPT or end of DATA refused by a --policy service, by protocol state and "
            "reply class",
            ["state", "reply"],
            registry=r,
        )
        self._server: Any = None

    def session_started(self) -> None:
        self.active.inc()

    def session_ended(self, result: str) -> None:
        self.active.dec()
        self.sessions.labels(result if result in SESSION_RESULTS else "other").inc()

    def auth(self, mechanism: str, decision: Decision) -> None:
        self.decisions.labels(mechanism.upper(), decision.verdict.value).inc()
        for attempt in decision.attempts:
            self.attempts.labels(attempt.backend, attempt.outcome.verdict.value).inc()
            self.latency.labels(attempt.backend).observe(attempt.ms / 1000.0)

    def delivery(self, reply: str) -> None:
        self.deliveries.labels(delivery_result(reply)).inc()

    def ratelimit_refused(self, key: str) -> None:
        self.refusals.labels(key if key in REFUSAL_KEYS else "other").inc()

    def ratelimit_lockout(self, key: str) -> None:
        self.lockouts.labels(key if key in REFUSAL_KEYS else "other").inc()

    def quota_exceeded(self, kind: str) -> None:
        self.quotas.labels(kind).inc()

    def policy_refused(self, state: str, reply: str) -> None:
        self.policy.labels(state, f"{reply[:1]}xx").inc()  # 4xx or 5xx, few series

    def start(self, host: str, port: int, **bounds: Any) -> None:
        """Serve the registry on HOST:PORT (bounds: metrics_server.start's limits)."""
        import prometheus_client as prom

        from ofmipd import metrics_server

        try:
            app = prom.make_wsgi_app(self.registry)
            self._server = metrics_server.start(host, port, app, **bounds)
        except OSError as error:
            raise ConfigError(f"--metrics {host}:{port}: {error.strerror or error}") from None

    @property
    def port(self) -> int | None:
        return int(self._server.server_address[1]) if self._server else None

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT or :PORT (loopback) -> (host, port)."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not port_text.isascii() or not port_text.isdigit():  # int() takes "²" too
        raise ConfigError(f"--metrics {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9101")
    if not 0 < int(port_text) < 65536:
        raise ConfigError(f"--metrics {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9101")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host or "127.0.0.1"  # exporters are private unless the admin says otherwise
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"--metrics {text!r}: bad IPv6 address") from None
    return host, int(port_text)


def create(address: str | None) -> Metrics:
    """The Metrics for --metrics ADDRESS (None: the no-op); the caller calls start()."""
    if not address:
        return NoMetrics()
    parse_address(address)
    return PrometheusMetrics()


def serve(address: str | None) -> Metrics:
    """create() and start() in one: what the daemon calls once at start-up."""
    metrics = create(address)
    if address:
        metrics.start(*parse_address(address))
    return metrics
