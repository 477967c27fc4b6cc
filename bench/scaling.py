"""Scaling set-ups: `--workers N` on one host, and ofmipd nodes behind haproxy sharing Redis.

The nodes run as they would on separate hosts: each its own daemon with
`--proxy-protocol 127.0.0.1` and `--ratelimit redis://...` on one shared redis-server,
behind a real haproxy in TCP mode that sends PROXY v2 headers and balances leastconn.
Everything is started here on free loopback ports and stopped by the caller (`stop`).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from bench import systems
from bench.systems import Processes, Running, Workspace

HAPROXY = "/usr/sbin/haproxy"
REDIS = "redis-server"

# What each scaling variant is made of: (ofmipd nodes, haproxy in front, Redis rate limiter)
SETUPS: dict[str, tuple[int, bool, bool]] = {
    "one node direct": (1, False, True),
    "one node behind haproxy": (1, True, True),
    "two nodes behind haproxy": (2, True, True),
    "one node direct, no rate limiter": (1, False, False),  # what Redis costs
}
WORKER_COUNTS = (1, 2)


def group_cpu(groups: tuple[int, ...]) -> float:
    """CPU seconds (user + system) used so far by the processes in these groups: the live
    ones, plus the children they have reaped (tcpserver's sessions, Postfix's smtpd)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[2]) in groups:  # pgrp; then utime, stime, cutime, cstime in ticks
            total += sum(int(f) for f in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def start_redis(procs: Processes, ws: Workspace) -> tuple[int, int, Callable[[], None]]:
    """redis-server on a free port: (port, its process group, stop)."""
    port = systems.free_port()
    home = ws.root / f"redis-{port}"
    home.mkdir()
    log = ws.logs / "redis.log"
    # no persistence: only lock-out counters live here, and fsyncs would add noise
    argv = [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(home),
            "--save", "", "--appendonly", "no", "--daemonize", "no"]  # fmt: skip
    proc = procs.spawn(argv, log)
    try:
        systems.wait_for_port(port, proc, log, hello=b"PING\r\n", expect=b"+PONG")
    except Exception:
        procs.stop(proc)
        raise
    return port, proc.pid, lambda: procs.stop(proc)


def start_ofmipd(
    procs: Processes, ws: Workspace, name: str, extra: list[str], proxied: bool
) -> Running:
    port = systems.free_port()
    log = ws.logs / f"{name}.log"
    argv = systems.ofmipd_args(ws, "maildir", name, ["-a", str(ws.users)], port, extra)
    proc = procs.spawn(argv, log)
    try:
        if proxied:
            # A trusted peer that sends no PROXY header is dropped: send one.
            header = b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 25\r\n"
            systems.wait_for_port(port, proc, log, hello=header, expect=b"220")
        else:
            systems.wait_for_port(port, proc, log)
    except Exception:
        procs.stop(proc)
        raise
    return Running(name, port, proc.pid, lambda: procs.stop(proc), (proc.pid,))


def haproxy_config(front: int, backends: list[int], balance: str = "leastconn") -> str:
    servers = "\n".join(
        f"    server node{i} 127.0.0.1:{port} send-proxy-v2" for i, port in enumerate(backends, 1)
    )
    # In the foreground (no "daemon"), so it lives in the process group we stop. No health
    # checks: they would add sessions of their own to the counts being compared.
    return f"""global
    maxconn 4000

defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m

frontend submission
    bind 127.0.0.1:{front}
    default_backend ofmipd

backend ofmipd
    balance {balance}
{servers}
"""


def start_haproxy(procs: Processes, ws: Workspace, name: str, backends: list[int]) -> Running:
    front = systems.free_port()
    config = ws.root / f"{name}.cfg"
    config.write_text(haproxy_config(front, backends))
    log = ws.logs / f"{name}.log"
    check = subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"haproxy config: {check.stdout}{check.stderr}")
    proc = procs.spawn([HAPROXY, "-db", "-f", str(config)], log)
    try:
        systems.wait_for_port(front, proc, log)
    except Exception:
        procs.stop(proc)
        raise
    return Running(name, front, proc.pid, lambda: procs.stop(proc), (proc.pid,))


def start_workers(procs: Processes, ws: Workspace, count: int) -> Running:
    return start_ofmipd(procs, ws, f"workers-{count}", ["--workers", str(count)], proxied=False)


def start_setup(
    procs: Processes, ws: Workspace, setup: str, redis_port: int, redis_group: int
) -> Running:
    """One of SETUPS; the Running's port is where clients connect, its stop stops it all.
    Its CPU includes the shared redis-server's: only one set-up is measured at a time."""
    nodes, proxied, redis = SETUPS[setup]
    shared = ["--ratelimit", f"redis://127.0.0.1:{redis_port}/0" if redis else "off"]
    if proxied:
        shared += ["--proxy-protocol", "127.0.0.1"]
    slug = setup.replace(",", "").replace(" ", "-")
    started: list[Running] = []
    try:
        for i in range(nodes):
            started.append(start_ofmipd(procs, ws, f"{slug}-node{i + 1}", shared, proxied))
        if proxied:
            started.append(start_haproxy(procs, ws, f"{slug}-haproxy", [r.port for r in started]))
    except Exception:
        for r in started:
            r.stop()  # type: ignore[operator]
        raise

    def stop() -> None:
        for r in reversed(started):
            r.stop()  # type: ignore[operator]

    groups = (*(r.pid for r in started), redis_group)
    return Running(setup, started[-1].port, started[0].pid, stop, groups)
