"""Where ofmipd's event loop spends its time under load: `python -m bench.profile`.

Starts the ofmipd daemon (authfile, Maildir), attaches py-spy (`pip install py-spy`),
runs N sessions at concurrency C, and prints the functions with the largest share of
the main thread's samples (inclusive and self). Worker threads (Maildir fsync) are left
out: they do not hold up the loop.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import load, systems


def summarize(raw: Path, top: int) -> str:
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if "serve_daemon" not in stack:  # only the event loop thread
            continue
        n = int(count)
        total += n
        frames = [f.split(" (")[0] for f in stack.split(";")]
        own[stack.split(";")[-1]] += n
        for name in set(frames):
            inclusive[name] += n
    if not total:
        return "no samples of the event loop thread"
    out = [f"event-loop samples: {total}", "inclusive:"]
    out += [f"  {100 * n / total:5.1f}% {name}" for name, n in inclusive.most_common(top)]
    out += ["self:"]
    out += [f"  {100 * n / total:5.1f}% {name}" for name, n in own.most_common(top // 2)]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--sessions", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--starttls", action="store_true")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    temp = Path(tempfile.mkdtemp(prefix="ofmipd-bench-profile-"))
    procs = systems.Processes()
    try:
        ws = systems.Workspace(temp)
        server = systems.start(procs, ws, "ofmipd", "maildir")
        raw = temp / "profile.raw"
        spy = subprocess.Popen(
            [pyspy, "record", "-p", str(server.pid), "-r", "200", "-f", "raw", "-o", str(raw)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.5)  # py-spy attaches
        result = asyncio.run(
            load.run_load(
                "127.0.0.1",
                server.port,
                sessions=args.sessions,
                concurrency=args.concurrency,
                starttls=args.starttls,
            )
        )
        spy.send_signal(2)  # py-spy writes its file on SIGINT
        spy.wait(30)
        print(f"{result.rate:.1f} sessions/s while profiled")
        print(summarize(raw, args.top))
    finally:
        procs.stop_all()
        shutil.rmtree(temp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
