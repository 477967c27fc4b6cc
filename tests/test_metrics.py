"""Prometheus metrics: events recorded through the facade are scraped over real HTTP."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import pytest
from conftest import ROOT, free_port
from prometheus_client.parser import text_string_to_metric_families

from ofmipd.app import NoMetrics
from ofmipd.auth import Attempt, Decision, Outcome, Verdict
from ofmipd.errors import ConfigError
from ofmipd.metrics import PrometheusMetrics, delivery_result, parse_address, serve


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def decision(verdict: Verdict, *attempts: tuple[str, Verdict, float]) -> Decision:
    return Decision(
        verdict=verdict,
        user="alice",
        attempts=tuple(
            Attempt(backend=b, target="t", outcome=Outcome(v, "why"), ms=ms)
            for b, v, ms in attempts
        ),
    )


def test_events_show_up_in_the_scraped_text_format() -> None:
    port = free_port()
    metrics = serve(f"127.0.0.1:{port}")
    assert isinstance(metrics, PrometheusMetrics) and metrics.port == port
    try:
        for _ in range(3):
            metrics.session_started()
        metrics.session_ended("authenticated")
        metrics.session_ended("bogus-result")
        metrics.auth("plain", decision(Verdict.ACCEPT, ("authfile", Verdict.ACCEPT, 2.0)))
        metrics.auth(
            "LOGIN",
            decision(
                Verdict.REJECT,
                ("authfile", Verdict.REJECT, 0.5),
                ("ldap", Verdict.REJECT, 300.0),
            ),
        )
        metrics.auth("PLAIN", decision(Verdict.TEMPFAIL, ("ldap", Verdict.TEMPFAIL, 3000.0)))
        for reply in ("250 2.0.0 Ok: queued", "451 4.3.0 later", "554 5.7.1 no", "250 ok"):
            metrics.delivery(reply)
        metrics.ratelimit_refused("ip")
        metrics.ratelimit_refused("ip")
        metrics.ratelimit_refused("user")
        metrics.ratelimit_lockout("ip")

        s = scrape(port)
        assert s[("ofmipd_sessions_active", ())] == 1
        assert s[("ofmipd_sessions_total", (("result", "authenticated"),))] == 1
        assert s[("ofmipd_sessions_total", (("result", "other"),))] == 1
        decisions = "ofmipd_auth_decisions_total"
        assert s[(decisions, (("mechanism", "PLAIN"), ("verdict", "accept")))] == 1
        assert s[(decisions, (("mechanism", "LOGIN"), ("verdict", "reject")))] == 1
        assert s[(decisions, (("mechanism", "PLAIN"), ("verdict", "tempfail")))] == 1
        attempts = "ofmipd_auth_attempts_total"
        assert s[(attempts, (("backend", "authfile"), ("verdict", "accept")))] == 1
        assert s[(attempts, (("backend", "authfile"), ("verdict", "reject")))] == 1
        assert s[(attempts, (("backend", "ldap"), ("verdict", "reject")))] == 1
        assert s[(attempts, (("backend", "ldap"), ("verdict", "tempfail")))] == 1
        assert s[("ofmipd_auth_seconds_count", (("backend", "ldap"),))] == 2
        assert s[("ofmipd_auth_seconds_sum", (("backend", "ldap"),))] == pytest.approx(3.3)
        assert s[("ofmipd_auth_seconds_bucket", (("backend", "ldap"), ("le", "0.5")))] == 1
        assert s[("ofmipd_auth_seconds_bucket", (("backend", "ldap"), ("le", "5.0")))] == 2
        assert s[("ofmipd_auth_seconds_bucket", (("backend", "authfile"), ("le", "0.001")))] == 1
        assert s[("ofmipd_deliveries_total", (("result", "250"),))] == 2
        assert s[("ofmipd_deliveries_total", (("result", "4xx"),))] == 1
        assert s[("ofmipd_deliveries_total", (("result", "5xx"),))] == 1
        assert s[("ofmipd_ratelimit_refusals_total", (("key", "ip"),))] == 2
        assert s[("ofmipd_ratelimit_refusals_total", (("key", "user"),))] == 1
        assert s[("ofmipd_ratelimit_lockouts_total", (("key", "ip"),))] == 1

        metrics.session_ended("timeout")
        assert scrape(port)[("ofmipd_sessions_active", ())] == 0
    finally:
        metrics.stop()


def test_two_instances_keep_separate_counts() -> None:
    one, two = PrometheusMetrics(), PrometheusMetrics()  # private registries: no clash
    port = free_port()
    one.start("127.0.0.1", port)
    try:
        two.delivery("250 ok")
        one.delivery("554 no")
        s = scrape(port)
        assert s[("ofmipd_deliveries_total", (("result", "5xx"),))] == 1
        assert ("ofmipd_deliveries_total", (("result", "250"),)) not in s
    finally:
        one.stop()


def test_busy_port_is_a_config_error() -> None:
    port = free_port()
    first = serve(f"127.0.0.1:{port}")
    try:
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}"):
            serve(f"127.0.0.1:{port}")
    finally:
        first.stop()


def test_without_metrics_prometheus_client_is_never_imported() -> None:
    code = (
        "import sys\n"
        "from ofmipd.metrics import serve\n"
        "m = serve(None)\n"
        "m.session_started(); m.delivery('250 ok'); m.ratelimit_refused('ip'); m.stop()\n"
        "assert not m.enabled\n"
        "print('prometheus_client' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    assert type(serve(None)) is NoMetrics


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:9101") == ("127.0.0.1", 9101)
    assert parse_address("[::1]:9101") == ("::1", 9101)
    assert parse_address(":9101") == ("127.0.0.1", 9101)
    assert parse_address("0.0.0.0:9101") == ("0.0.0.0", 9101)
    for bad in ("9101", "host:", "host:99999", "[::1:9101]x:1", "::zz:1"):
        with pytest.raises(ConfigError, match="--metrics"):
            parse_address(bad)
    assert delivery_result("250 2.0.0 ok") == "250"
    assert delivery_result("421 bye") == "4xx"
    assert delivery_result("") == "other"
