"""Side measurements: exec-to-banner, memory per idle connection, slow logins, AUTH cost."""

from __future__ import annotations

import asyncio
import hmac
import resource
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import load, systems
from bench.systems import PYTHON, Processes, Workspace

# ---- exec-to-banner -----------------------------------------------------------------


def exec_commands(ws: Workspace) -> dict[str, list[str]]:
    return {
        "ofmipd -1": systems.ofmipd_one_args(ws, "maildir", "exec", ["-a", str(ws.users)]),
        "bare aiosmtpd one-session": [*systems.bare_args(ws, "maildir", "exec"), "-1"],
        "python -c pass": [PYTHON, "-c", "pass"],
    }


def exec_to_banner(argv: list[str]) -> float:
    """Seconds from spawn to a complete 220 line on a socketpair (or to exit, without one)."""
    ours, theirs = socket.socketpair()
    start = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        stdin=theirs.fileno(),
        stdout=theirs.fileno(),
        stderr=subprocess.DEVNULL,
        env=systems.env(),
        cwd=str(systems.ROOT),
    )
    theirs.close()
    try:
        if argv[-1] == "pass":
            proc.wait(30)
            return time.perf_counter() - start
        ours.settimeout(30)
        data = b""
        while b"\n" not in data:
            chunk = ours.recv(4096)
            if not chunk:
                raise RuntimeError(f"{argv[:3]} closed before the banner")
            data += chunk
        elapsed = time.perf_counter() - start
        if not data.startswith(b"220 "):
            raise RuntimeError(f"{argv[:3]}: banner {data!r}")
        ours.sendall(b"QUIT\r\n")
        ours.recv(4096)
        proc.wait(30)
        return elapsed
    finally:
        ours.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- memory per idle connection -----------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


async def hold_connections(port: int, count: int) -> list[asyncio.StreamWriter]:
    """`count` connections that have seen the banner and EHLO, left open."""
    writers: list[asyncio.StreamWriter] = []

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
        await load.expect(reader, 220, "banner")
        await load.command(reader, writer, b"EHLO idle.example.org", 250)

    for first in range(0, count, 50):  # batches: the listen backlog is 128
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(first, first + 50))), 60)
    return writers


async def memory_per_connection(pid: int, port: int, count: int) -> float:
    """KiB of server RSS per idle connection (after a warm-up session)."""
    await load.run_load("127.0.0.1", port, sessions=5, concurrency=1)
    await hold_connections(port, 20)  # warm the per-connection code paths and caches
    await asyncio.sleep(0.3)
    before = rss_kib(pid)
    writers = await hold_connections(port, count)
    await asyncio.sleep(0.5)
    after = rss_kib(pid)
    for writer in writers:
        writer.close()
    return (after - before) / count


# ---- banner latency while slow logins are in flight ---------------------------------


async def banner_under_slow_logins(port: int, slow: int, clients: int) -> tuple[float, float]:
    """(banner p99, session p99) of `clients` sessions while `slow` 2-second logins wait."""
    stop = asyncio.Event()

    async def slow_login() -> None:
        while not stop.is_set():
            await load.one_session(
                "127.0.0.1",
                port,
                starttls=False,
                timings=load.Timings(),
                user="slowpoke",
                password="wrong-password",
                auth_code=535,
                full=False,
            )

    slow_tasks = [asyncio.create_task(slow_login()) for _ in range(slow)]
    try:
        if slow:
            await asyncio.sleep(0.5)  # the slow logins are now waiting on their program
        result = await load.run_load("127.0.0.1", port, sessions=clients, concurrency=clients)
    finally:
        stop.set()
        if slow_tasks:
            await asyncio.wait_for(asyncio.gather(*slow_tasks), 30)
    return result.banner_p99, result.session_p99


# ---- AUTH cost per backend ----------------------------------------------------------


def auth_backends(ws: Workspace) -> dict[str, list[str]]:
    return {
        "authfile": ["-a", str(ws.users)],
        "htpasswd (bcrypt cost 5)": ["--htpasswd", str(ws.htpasswd)],
        "checkpassword (/bin/true)": ["-A", "/bin/true"],
    }


def backend_specs(ws: Workspace) -> dict[str, tuple[str, str]]:
    return {
        "authfile": ("authfile", str(ws.users)),
        "htpasswd (bcrypt cost 5)": ("htpasswd", str(ws.htpasswd)),
        "checkpassword (/bin/true)": ("checkpassword", "/bin/true"),
    }


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def primitive_cost(name: str, ws: Workspace, repeat: int) -> tuple[str, float]:
    """The raw work under each backend, without ofmipd: (what, median seconds)."""
    if name.startswith("authfile"):
        stored = load.PASSWORD.encode()

        def read_and_compare() -> bool:
            for line in ws.users.read_bytes().splitlines():
                if line.split(b":", 1)[0] == load.USER.encode():
                    return hmac.compare_digest(line.split(b":", 1)[1], stored)
            return False

        return "read file + compare_digest", median_seconds(read_and_compare, repeat)
    if name.startswith("htpasswd"):
        import bcrypt

        hashed = ws.htpasswd.read_text().strip().split(":", 1)[1].encode()
        hashed = b"$2b$" + hashed[4:]  # Apache writes $2y$; same algorithm
        return "bcrypt.checkpw cost 5", median_seconds(
            lambda: bcrypt.checkpw(load.PASSWORD.encode(), hashed), repeat
        )
    return "fork+exec /bin/true", median_seconds(
        lambda: subprocess.run(["/bin/true"], check=True), repeat
    )


def verify_cost(kind: str, arg: str, repeat: int) -> float:
    """Median seconds of the backend's own verify(), in-process, no SMTP."""
    from auth_backends import BackendSpec, create
    from ofmipd.auth import Secret, Verdict
    from ofmipd.identity import ClientIdentity

    client = ClientIdentity(ip="127.0.0.1", port=40000, local_ip="127.0.0.1", local_port=25)

    async def run() -> float:
        backend = create(BackendSpec(kind=kind, arg=arg))
        times = []
        try:
            for _ in range(repeat):
                start = time.perf_counter()
                outcome = await backend.verify(load.USER, Secret(load.PASSWORD.encode()), client)
                times.append(time.perf_counter() - start)
                if outcome.verdict is not Verdict.ACCEPT:
                    raise RuntimeError(f"{kind} did not accept: {outcome.reason}")
        finally:
            close = getattr(backend, "close", None)
            if close is not None:
                await close()
        return statistics.median(times)

    return asyncio.run(run())


def start_ofmipd(
    procs: Processes, ws: Workspace, name: str, auth: list[str], extra: Sequence[str] = ()
) -> systems.Running:
    return systems.start_custom(
        procs,
        ws,
        name,
        lambda port: systems.ofmipd_args(ws, "maildir", name, auth, port, list(extra)),
    )
