"""`python -m bench [--quick] [--out DIR]`: run every system, write BENCHMARKS.md and a chart.

Each system is started on a free loopback port, measured with the same load, and
stopped again (also on Ctrl-C or failure). Runs are interleaved across systems: run 1
of every system, then run 2 of every system, and so on, in a rotating order.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path

from bench import extras, load, report, scaling, systems, wakeup
from bench import scram as scram_logins
from bench.systems import ROOT, Processes, Running, Workspace


def sessions_for(system: str, concurrency: int, quick: bool) -> int:
    if system in systems.TCPSERVER_SYSTEMS:  # a Python start per session: keep them few
        return max(6, concurrency) if quick else max(30, 2 * concurrency)
    # Enough sessions that one measurement lasts about a second or more at full speed.
    return max(20, 2 * concurrency) if quick else max(300, 15 * concurrency)


class Bench:
    def __init__(self, args: argparse.Namespace, ws: Workspace, procs: Processes) -> None:
        self.args, self.ws, self.procs = args, ws, procs
        self.quick = args.quick
        self.runs = args.runs or (1 if self.quick else 3)
        self.sweep = (1, 10) if self.quick else (1, 10, 20, 50)
        self.variant_c = 10 if self.quick else 20  # the targets are at C=20
        self.systems = tuple(s for s in systems.SYSTEMS if s not in args.skip)
        self.results: dict[str, list[dict[str, float]]] = {}
        self.side: dict[str, object] = {}
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[{elapsed:6.1f}s] {text}", file=sys.stderr, flush=True)

    def measure(self, server: Running, key: str, c: int, tls: bool) -> None:
        system = server.name
        n = sessions_for(system, c, self.quick)
        progress = load.Progress(f"{key} {system}", n, enabled=sys.stderr.isatty())
        before = scaling.group_cpu(server.groups)
        result = asyncio.run(
            load.run_load("127.0.0.1", server.port, sessions=n, concurrency=c, starttls=tls,
                          progress=progress)
        )  # fmt: skip
        # CPU per session is steadier than sessions/s on a shared machine: it does not
        # care how much of the time the server was waiting for a core.
        cpu_ms = (scaling.group_cpu(server.groups) - before) * 1000 / n
        row = asdict(result) | {"rate": result.rate, "cpu_ms": cpu_ms}
        self.results.setdefault(f"{key}|{system}", []).append(row)

    def throughput(self) -> None:
        groups = {
            "maildir": [(c, False) for c in self.sweep] + [(self.variant_c, True)],
            "sendmail": [(self.variant_c, False), (self.variant_c, True)],
        }
        if self.variant_c in self.sweep:
            groups["maildir"] = list(dict.fromkeys(groups["maildir"]))
        for delivery, points in groups.items():
            running = {}
            try:
                for system in self.systems:
                    self.say(f"starting {system} ({delivery})")
                    running[system] = systems.start(self.procs, self.ws, system, delivery)
                    for tls in (False, True):  # warm-up, not recorded
                        port = running[system].port
                        asyncio.run(
                            load.run_load(
                                "127.0.0.1", port, sessions=5, concurrency=5, starttls=tls
                            )
                        )
                for run in range(self.runs):
                    order = list(self.systems)
                    order = order[run % len(order) :] + order[: run % len(order)]
                    for c, tls in points:
                        key = f"{delivery}|{'starttls' if tls else 'plain'}|{c}"
                        for system in order:
                            self.say(f"run {run + 1}/{self.runs} {key} {system}")
                            self.measure(running[system], key, c, tls)
            finally:
                for r in running.values():
                    r.stop()  # type: ignore[operator]

    def exec_to_banner(self) -> None:
        commands = extras.exec_commands(self.ws)
        reps = 3 if self.quick else 20
        runs: dict[str, list[float]] = {name: [] for name in commands}
        for run in range(self.runs):
            self.say(f"exec-to-banner run {run + 1}/{self.runs}")
            # One start of each program in turn, so a burst of other work on the machine
            # lands on all of them alike, not on one program's block of starts.
            starts: dict[str, list[float]] = {name: [] for name in commands}
            for _ in range(reps):
                for name, argv in commands.items():
                    starts[name].append(extras.exec_to_banner(argv))
            for name, values in starts.items():
                runs[name].append(statistics.median(values))
        self.side["exec"] = {"reps": reps, "runs": runs}

    def memory(self) -> None:
        count = 100 if self.quick else 1000
        extras.raise_fd_limit(4 * count + 256)
        runs: dict[str, list[float]] = {"ofmipd": [], "bare-aiosmtpd": []}
        for run in range(self.runs):
            for name in runs:
                self.say(f"memory run {run + 1}/{self.runs} {name} ({count} connections)")
                if name == "ofmipd":
                    server = extras.start_ofmipd(
                        self.procs, self.ws, "mem-ofmipd", ["-a", str(self.ws.users)],
                        ["-C", "2000"],
                    )  # fmt: skip
                else:
                    server = systems.start_custom(
                        self.procs, self.ws, "mem-bare",
                        lambda p: [*systems.bare_args(self.ws, "maildir", "mem"),
                                   "--listen", f"127.0.0.1:{p}"],
                    )  # fmt: skip
                try:
                    runs[name].append(
                        asyncio.run(extras.memory_per_connection(server.pid, server.port, count))
                    )
                finally:
                    server.stop()  # type: ignore[operator]
        self.side["memory"] = {"connections": count, "runs": runs}

    def slow_logins(self) -> None:
        clients = 20 if self.quick else 50
        # The guessing limit would lock the slow guesser out after 5 tries (and its
        # address, which the measured clients share): this measures the loop, not that.
        server = extras.start_ofmipd(
            self.procs, self.ws, "slow-logins",
            ["-a", str(self.ws.users), "-A", "sleep 2; exit 1", "--ratelimit", "off"],
        )  # fmt: skip
        runs: dict[str, list[list[float]]] = {"none": [], "5 slow": []}
        try:
            asyncio.run(load.run_load("127.0.0.1", server.port, sessions=5, concurrency=5))
            for run in range(self.runs):
                for name, slow in (("none", 0), ("5 slow", 5)):
                    self.say(f"slow logins run {run + 1}/{self.runs}: {name}")
                    banner, session = asyncio.run(
                        extras.banner_under_slow_logins(server.port, slow, clients)
                    )
                    runs[name].append([banner, session])
        finally:
            server.stop()  # type: ignore[operator]
        self.side["slow"] = {"clients": clients, "runs": runs}

    def auth_cost(self) -> None:
        sessions = 10 if self.quick else 40
        reps = 20 if self.quick else 200
        rtt: dict[str, list[float]] = {}
        servers = {}
        try:
            for name, auth in extras.auth_backends(self.ws).items():
                servers[name] = extras.start_ofmipd(self.procs, self.ws, f"auth-{name[:8]}", auth)
            servers["bare aiosmtpd (dict)"] = systems.start_custom(
                self.procs, self.ws, "auth-bare",
                lambda p: [*systems.bare_args(self.ws, "maildir", "auth"),
                           "--listen", f"127.0.0.1:{p}"],
            )  # fmt: skip
            for server in servers.values():
                asyncio.run(load.run_load("127.0.0.1", server.port, sessions=3, concurrency=1))
            for run in range(self.runs):
                for name, server in servers.items():
                    self.say(f"AUTH latency run {run + 1}/{self.runs}: {name}")
                    result = asyncio.run(
                        load.run_load("127.0.0.1", server.port, sessions=sessions, concurrency=1)
                    )
                    rtt.setdefault(name, []).append(result.auth_p50)
        finally:
            for server in servers.values():
                server.stop()  # type: ignore[operator]
        verify: dict[str, float] = {}
        primitive: dict[str, tuple[str, float]] = {}
        for name, (kind, arg) in extras.backend_specs(self.ws).items():
            verify[name] = extras.verify_cost(kind, arg, reps)
            primitive[name] = extras.primitive_cost(name, self.ws, reps)
        self.side["auth"] = {
            "sessions": sessions, "rtt": rtt, "verify": verify, "primitive": primitive,
        }  # fmt: skip

    def scram(self) -> None:
        logins = 10 if self.quick else 100
        users = scram_logins.write_passwd_file(self.ws.root)
        server = extras.start_ofmipd(self.procs, self.ws, "scram", ["--passwd-file", str(users)])
        runs: dict[str, list[float]] = {}
        try:
            asyncio.run(scram_logins.round_of_logins(server.port, 3, 0))  # warm-up
            for run in range(self.runs):
                self.say(f"SCRAM beside PLAIN run {run + 1}/{self.runs} ({logins} logins each)")
                medians = asyncio.run(scram_logins.round_of_logins(server.port, logins, run % 2))
                for name, value in medians.items():
                    runs.setdefault(name, []).append(value)
        finally:
            server.stop()  # type: ignore[operator]
        self.side["scram"] = {"logins": logins, "runs": runs}

    def wakeup(self) -> None:
        self.say("loop wake-up costs (bench.wakeup)")
        rows = asyncio.run(wakeup.measure(30 if self.quick else 300))
        self.side["wakeup"] = [list(row) for row in rows]

    def interleaved(
        self, label: str, starters: Mapping[str, Callable[[], Running]], c: int, n: int, runs: int
    ) -> dict[str, list[dict[str, float]]]:
        """Start every set-up, warm each up, then `runs` rotating rounds of n sessions at C=c."""
        results: dict[str, list[dict[str, float]]] = {name: [] for name in starters}
        running: dict[str, Running] = {}
        try:
            for name, start in starters.items():
                self.say(f"starting {label}: {name}")
                running[name] = start()
                asyncio.run(load.run_load("127.0.0.1", running[name].port, sessions=10,
                                          concurrency=5))  # fmt: skip
            names = list(starters)
            for run in range(runs):
                for name in names[run % len(names) :] + names[: run % len(names)]:
                    self.say(f"{label} run {run + 1}/{runs} C={c}: {name}")
                    progress = load.Progress(f"{label} {name}", n, enabled=sys.stderr.isatty())
                    groups = running[name].groups
                    cpu, server = time.process_time(), scaling.group_cpu(groups)
                    result = asyncio.run(
                        load.run_load("127.0.0.1", running[name].port, sessions=n,
                                      concurrency=c, progress=progress)
                    )  # fmt: skip
                    cpu = (time.process_time() - cpu) / result.seconds  # the load generator
                    server = (scaling.group_cpu(groups) - server) / result.seconds
                    row = asdict(result) | {"rate": result.rate, "client_cpu": cpu}
                    results[name].append(row | {"server_cpu": server})
        finally:
            for r in reversed(list(running.values())):
                r.stop()  # type: ignore[operator]
        return results

    def scaling_params(self) -> tuple[int, int, int]:
        """Concurrency, sessions per measurement, runs: the full run wants steady state."""
        if self.quick:
            return 10, 20, self.runs
        return 50, 500, max(self.runs, 5)

    def workers(self) -> None:
        c, n, runs = self.scaling_params()
        starters = {
            f"--workers {k}": functools.partial(scaling.start_workers, self.procs, self.ws, k)
            for k in scaling.WORKER_COUNTS
        }
        results = self.interleaved("workers", starters, c, n, runs)
        self.side["workers"] = {"concurrency": c, "sessions": n, "runs": results}

    def scaling(self) -> None:
        c, n, runs = self.scaling_params()
        redis_port, redis_group, stop_redis = scaling.start_redis(self.procs, self.ws)
        try:
            starters = {
                setup: functools.partial(
                    scaling.start_setup, self.procs, self.ws, setup, redis_port, redis_group
                )
                for setup in scaling.SETUPS
            }
            results = self.interleaved("scaling", starters, c, n, runs)
        finally:
            stop_redis()
        self.side["scaling"] = {"concurrency": c, "sessions": n, "runs": results}

    def run(self) -> None:
        self.throughput()
        self.workers()
        self.scaling()
        self.exec_to_banner()
        self.memory()
        self.slow_logins()
        self.auth_cost()
        self.scram()
        self.wakeup()


# Side sections --only can run alone: the key in results.json's "side" -> Bench method.
SECTIONS = {"exec": "exec_to_banner", "memory": "memory", "slow": "slow_logins",
            "auth": "auth_cost", "scram": "scram", "wakeup": "wakeup", "workers": "workers",
            "scaling": "scaling"}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute")
    parser.add_argument("--out", type=Path, help="directory for BENCHMARKS.md and the chart "
                        "(default: the repository, chart in bench/)")  # fmt: skip
    parser.add_argument("--runs", type=int, help="runs per figure (default 3; quick 1)")
    parser.add_argument("--skip", action="append", default=[], choices=systems.SYSTEMS,
                        help="leave a system out (repeatable)")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    parser.add_argument("--render", action="store_true", help="measure nothing: write the "
                        "report again from the last run's results.json")  # fmt: skip
    parser.add_argument("--only", choices=SECTIONS, help="run this one side section and "
                        "merge it into the last run's results.json, then write the report "
                        "again (the other figures stay as they were measured)")  # fmt: skip
    args = parser.parse_args()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        md, png, raw = args.out / "BENCHMARKS.md", args.out / "sessions.png", args.out
    else:
        md, png, raw = ROOT / "BENCHMARKS.md", ROOT / "bench" / "sessions.png", ROOT / "bench"
    if args.render:
        report.write(json.loads((raw / "results.json").read_text()), md, png)
        print(f"wrote {md} and {png}", file=sys.stderr)
        return 0
    if args.only and not (raw / "results.json").exists():
        print(f"--only needs a previous run's {raw / 'results.json'}", file=sys.stderr)
        return 2

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwind through every finally, stopping what we started

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    # An installed ofmipd has its bytecode compiled (pip does it); a checkout run with
    # PYTHONDONTWRITEBYTECODE would compile every module at every one-session start.
    subprocess.run([sys.executable, "-m", "compileall", "-q", "ofmipd", "auth_backends", "bench"],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    load_start = os.getloadavg()
    temp = Path(tempfile.mkdtemp(prefix="ofmipd-bench-"))
    temp.chmod(0o755)
    procs = Processes()
    bench = None
    try:
        ws = Workspace(temp)
        bench = Bench(args, ws, procs)
        if args.only:
            getattr(bench, SECTIONS[args.only])()
        else:
            bench.run()
        systems.check_logs(ws)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - whatever broke, say so and keep the logs
        print(f"\nbench failed: {type(error).__name__}: {error}", file=sys.stderr)
        print(f"logs: {temp / 'logs'}", file=sys.stderr)
        args.keep = True
        return 1
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(temp, ignore_errors=True)
    if args.only:
        data = json.loads((raw / "results.json").read_text())
        command = f"python -m bench --only {args.only}" + (" --quick" if args.quick else "")
        section = bench.side[args.only]
        if isinstance(section, dict):  # the report says when it was measured (wakeup's a list)
            section = {**section, "measured": report.stamp(command)}
        data["side"][args.only] = section
        (raw / "results.json").write_text(json.dumps(data, indent=1))
        report.write(data, md, png)
        print(f"wrote {md} and {png} ({args.only} measured again)", file=sys.stderr)
        return 0
    data = {
        "quick": args.quick,
        "runs": bench.runs,
        "results": bench.results,
        "side": bench.side,
        "systems": list(bench.systems),
        "sweep": list(bench.sweep),
        "variant_c": bench.variant_c,
        "loadavg": [load_start, os.getloadavg()],
        "machine": report.machine(),  # so that --render and --only keep this run's header
        "seconds": time.monotonic() - bench.started,
    }
    (raw / "results.json").write_text(json.dumps(data, indent=1))  # the report's raw figures
    report.write(data, md, png)
    print(f"wrote {md} and {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
