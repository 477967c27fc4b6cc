"""Prometheus metrics: events recorded through the facade are scraped over real HTTP."""

from __future__ import annotations

import itertools
import os
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import ROOT, free_port
from prometheus_client.parser import text_string_to_metric_families

from ofmipd.app import NoMetrics
from ofmipd.auth import Attempt, Decision, Outcome, Verdict
from ofmipd.errors import ConfigError
from ofmipd.metrics import PrometheusMetrics, delivery_result, parse_address, serve
from tests.ofmipd_server import authfile, start_daemon


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


# ---- the endpoint is bounded: threads, connections, time ------------------------------


def bounded(deadline: float) -> tuple[PrometheusMetrics, int]:
    metrics, port = PrometheusMetrics(), free_port()
    metrics.start("127.0.0.1", port, max_connections=8, deadline=deadline)
    return metrics, port


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (TimeoutError if not)."""
    sock.settimeout(timeout)
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def replies_and_close_times(
    socks: list[socket.socket], timeout: float
) -> list[tuple[bytes, float]]:
    """For each socket, what the server sent until it closed, and when it closed."""
    found: dict[socket.socket, tuple[bytes, float]] = {}
    data = dict.fromkeys(socks, b"")
    deadline = time.monotonic() + timeout
    while len(found) < len(socks) and time.monotonic() < deadline:
        ready, _, _ = select.select([s for s in socks if s not in found], [], [], 0.1)
        for sock in ready:
            chunk = sock.recv(4096)
            data[sock] += chunk
            if not chunk:
                found[sock] = (data[sock], time.monotonic())
    assert len(found) == len(socks), "the server left connections open"
    return [found[sock] for sock in socks]


@pytest.mark.slow
def test_idle_connections_hold_few_threads_and_are_closed_after_the_deadline() -> None:
    metrics, port = bounded(deadline=1.5)
    before = threading.active_count()
    idle, opened = [], []
    try:
        for n in range(200):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            opened.append(time.monotonic())
            if n % 20 == 19:  # eight are served (each waits for its request): not 200 threads
                assert threading.active_count() <= before + 8
        replies = replies_and_close_times(idle, timeout=30)
        refused = [r for r, _ in replies if r.startswith(b"HTTP/1.0 503 Service Unavailable")]
        held = [closed - at for (r, closed), at in zip(replies, opened) if r == b""]
        assert len(refused) + len(held) == 200 and len(refused) > 100
        # The ones served were closed at their deadline (from accept), not before.
        assert held and all(1.4 <= seconds < 6 for seconds in held), held
        # The deadlines freed the slots: a scrape answers, and the threads are gone.
        assert ("ofmipd_sessions_active", ()) in scrape(port)
        time.sleep(0.2)
        assert threading.active_count() <= before
    finally:
        for sock in idle:
            sock.close()
        metrics.stop()


def serving_threads() -> int:
    """The metrics server's connection threads (socketserver names them after the method):
    other tests' leftover threads ending meanwhile must not move the count."""
    return sum("process_request_thread" in t.name for t in threading.enumerate())


def test_beyond_the_bound_a_client_hears_503_at_once() -> None:
    metrics, port = bounded(deadline=30)
    before = serving_threads()

    def wait_for_threads(count: int) -> None:
        for _ in range(100):
            if serving_threads() == count:
                return
            time.sleep(0.05)
        assert serving_threads() == count

    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(7)]
    try:
        wait_for_threads(before + 7)
        metrics.delivery("250 ok")  # seven idle connections: a scrape still has a slot
        assert scrape(port)[("ofmipd_deliveries_total", (("result", "250"),))] == 1
        # The scrape's thread gives its slot back just after the reply: until it is gone,
        # an eighth connection could be the one refused.
        wait_for_threads(before + 7)
        idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        wait_for_threads(before + 8)  # all slots taken
        started = time.monotonic()
        with pytest.raises(urllib.error.HTTPError, match="503"):
            scrape(port)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as ninth:
            reply = read_until_closed(ninth, timeout=10)
        assert reply.startswith(b"HTTP/1.0 503 Service Unavailable\r\n")
        assert time.monotonic() - started < 2  # not after the 30 s deadline
        for sock in idle:
            sock.close()  # the slots free as soon as their clients go
        wait_for_threads(before)
        assert ("ofmipd_sessions_active", ()) in scrape(port)
    finally:
        for sock in idle:
            sock.close()
        metrics.stop()


@pytest.mark.slow
def test_a_request_line_sent_a_byte_at_a_time_is_dropped_at_the_deadline() -> None:
    metrics, port = bounded(deadline=1.5)
    started = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            # Each byte comes well within the socket timeout; the deadline still ends it.
            for byte in itertools.cycle(b"GET /metrics?x=slowloris"):
                ready, _, _ = select.select([sock], [], [], 0.2)
                if ready or time.monotonic() - started > 10:
                    break
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    break
            assert read_until_closed(sock, timeout=5) == b""  # no reply at all
        assert 1.4 <= time.monotonic() - started < 6
    finally:
        metrics.stop()


def tasks(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@pytest.mark.slow
def test_a_daemon_keeps_its_thread_count_under_200_idle_metrics_connections(tmp_path) -> None:
    users = authfile(tmp_path, "gina:pw\n")
    port = free_port()
    daemon = start_daemon(tmp_path, users, tmp_path, "--metrics", f"127.0.0.1:{port}")
    idle = []
    try:
        scrape(port)
        before = tasks(daemon.proc.pid)
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(200)]
        time.sleep(0.5)
        assert tasks(daemon.proc.pid) <= before + 8  # was before + 200
        for sock in idle:
            sock.close()
        time.sleep(0.3)
        assert ("ofmipd_sessions_active", ()) in scrape(port)
    finally:
        for sock in idle:
            sock.close()
        daemon.stop()
    assert "Traceback" not in daemon.log_text()
