"""`python -m bench --quick` runs end to end: every system completes every session.

Only correctness is asserted (exit 0, every measured point has all its sessions, the
report and chart exist), never speed: the machine running the tests may be busy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bench import systems

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = set(systems.SYSTEMS)  # every system the bench knows must report


@pytest.mark.slow
@pytest.mark.bench
@pytest.mark.timeout(900)
def test_quick_bench_completes_every_session(tmp_path):
    out = tmp_path / "out"
    # The bench's temp dir goes under a dir of our own, so the leftover check below sees
    # only this run; not under tmp_path, which Postfix's unprivileged daemons cannot enter.
    scratch = Path(tempfile.mkdtemp(prefix="ofmipd-bench-test-", dir="/tmp"))
    scratch.chmod(0o755)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
            cwd=ROOT,
            env=dict(os.environ, TMPDIR=str(scratch)),
            capture_output=True,
            text=True,
            timeout=850,
        )
        # nothing the benchmark started is left running
        left = subprocess.run(["pgrep", "-af", str(scratch)], capture_output=True, text=True)
        assert left.stdout.strip() == "", left.stdout
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    cpu: dict[str, float] = {}
    for key, runs in data["results"].items():
        delivery, tls, concurrency, system = key.split("|")
        assert len(runs) == data["runs"], key
        for run in runs:
            assert run["sessions"] >= 6, key
            assert run["concurrency"] == int(concurrency), key
            assert run["rate"] > 0, key
            assert run["cpu_ms"] >= 0, key
            cpu[system] = cpu.get(system, 0.0) + run["cpu_ms"]
    assert set(cpu) == SYSTEMS
    # The server's processes were found and measured. Summed over its runs: CPU time
    # comes in clock ticks (10 ms), more than a quick run of a lean server may use.
    assert all(total > 0 for total in cpu.values()), cpu
    # every system measured at every point: 2 sweep points + 3 variants
    assert len(data["results"]) == len(SYSTEMS) * 5
    side = data["side"]
    assert set(side["exec"]["runs"]) == {"ofmipd -1", "bare aiosmtpd one-session", "python -c pass"}
    assert set(side["memory"]["runs"]) == {"ofmipd", "bare-aiosmtpd"}
    assert set(side["slow"]["runs"]) == {"none", "5 slow"}
    assert len(side["auth"]["rtt"]) == 4
    assert set(side["scram"]["runs"]) == {"PLAIN", "SCRAM-SHA-256", "SCRAM client work"}
    assert len(side["wakeup"]) == 4 and all(looped > 0 for _, looped, _ in side["wakeup"])
    # --workers 1 and 2; one node, one behind haproxy, two behind haproxy with shared Redis
    assert set(side["workers"]["runs"]) == {"--workers 1", "--workers 2"}
    assert set(side["scaling"]["runs"]) == {
        "one node direct",
        "one node behind haproxy",
        "two nodes behind haproxy",
        "one node direct, no rate limiter",
    }
    for part in ("workers", "scaling"):
        for name, runs in side[part]["runs"].items():
            assert len(runs) == data["runs"], name
            for run in runs:
                # run_load raises on any failed session, so a row means all completed
                assert run["sessions"] == side[part]["sessions"] >= 6, name
                assert run["concurrency"] == side[part]["concurrency"], name
                assert run["rate"] > 0, name
    report = (out / "BENCHMARKS.md").read_text()
    assert "ofmipd ÷" in report and "not implemented" not in report
    assert "## Targets (issue 8)" in report and "| `ofmipd -1` exec-to-banner" in report
    assert "`--workers 2` ÷ `--workers 1`" in report and "two ofmipd nodes behind haproxy" in report
    assert (out / "sessions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.bench
def test_only_scram_measures_that_section_and_keeps_the_rest(tmp_path):
    """`--only scram` runs SCRAM beside PLAIN alone and merges it into the last results."""
    previous = json.loads((ROOT / "bench" / "results.json").read_text())
    previous["side"].pop("scram", None)
    (tmp_path / "results.json").write_text(json.dumps(previous))
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "scram", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["results"] == previous["results"]  # nothing else was measured again
    runs = data["side"]["scram"]["runs"]
    assert set(runs) == {"PLAIN", "SCRAM-SHA-256", "SCRAM client work"}
    assert all(len(values) == 1 and values[0] > 0 for values in runs.values())
    report = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## SCRAM-SHA-256 beside PLAIN (one passwd-file user)" in report
    assert "SCRAM-SHA-256 ÷ PLAIN round trip: " in report
    missing = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "scram", "--out", str(tmp_path / "empty")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "needs a previous run" in missing.stderr
