"""The systems under test: how to start each on a free loopback port, and stop it again.

Every system gets the same user, password, message and delivery work: a Maildir
(fsync) or a sendmail-compatible program that reads the message and exits 0. Postfix
always queues (fsynced queue file) and then discards, whatever the variant.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import load
from bench.postfix import PostfixDovecot

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable  # the venv's interpreter itself, not a pyenv shim
BARE = str(ROOT / "bench" / "bare_aiosmtpd.py")
CONNECTIONS = "200"  # ofmipd's -C: above every concurrency used, so nobody waits in accept


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int,
    proc: subprocess.Popen[bytes] | None,
    log: Path,
    hello: bytes = b"",
    expect: bytes = b"",
) -> None:
    """Until the server on port answers: send `hello` (if any), and the first reply must
    start with `expect` (the default takes any banner). Raises if proc exits first."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {log.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.settimeout(10)
                if hello:
                    s.sendall(hello)
                if s.recv(1024).startswith(expect):  # really serving, not just listening
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"no answer from 127.0.0.1:{port}")


def check_logs(ws: Workspace) -> None:
    """Raise if a server logged an error: a figure measured with a fallback (a rate-limit
    store that could not be opened, say) is not the figure it claims to be."""
    for log in sorted(ws.logs.glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if " ERROR " in line:
                raise RuntimeError(f"{log.name}: {line}")


def env() -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = str(ROOT)
    return out


class Workspace:
    """Users file, htpasswd (bcrypt cost 5), certificate, sink program, Maildirs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.users = root / "users"
        self.users.write_text(f"{load.USER}:{load.PASSWORD}\n")
        self.users.chmod(0o600)
        self.htpasswd = root / "htpasswd"
        subprocess.run(
            ["htpasswd", "-cbB", "-C", "5", str(self.htpasswd), load.USER, load.PASSWORD],
            check=True,
            capture_output=True,
        )
        self.htpasswd.chmod(0o600)
        self.cert, self.key = root / "cert.pem", root / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "2", "-subj", "/CN=bench", "-keyout", str(self.key),
             "-out", str(self.cert)],
            check=True, capture_output=True,
        )  # fmt: skip
        self.sink = root / "sink-sendmail"
        self.sink.write_text("#!/bin/sh\nexec cat >/dev/null\n")
        self.sink.chmod(0o755)
        self.slow = root / "slow-checkpassword"
        # All load comes from 127.0.0.1; ofmipd's per-address limit (default 10) would refuse it.
        self.config = root / "ofmipd.toml"
        self.config.write_text("max_per_ip = 100000\n")
        self.config.chmod(0o600)
        (root / "state").mkdir(mode=0o700, exist_ok=True)  # each system's state dir is in it
        self.logs = root / "logs"
        self.logs.mkdir(exist_ok=True)

    def maildir(self, name: str) -> Path:
        return self.root / "maildirs" / name

    def state_args(self, name: str) -> list[str]:
        """Guessing limits are on by default: each system counts in a store of its own
        (the SQLite default), never in /var/lib/ofmipd."""
        return ["--state-dir", str(self.root / "state" / name)]

    def delivery_args(self, delivery: str, name: str) -> list[str]:
        if delivery == "maildir":
            return ["--maildir", str(self.maildir(name))]
        return ["--sendmail", str(self.sink)]


@dataclass
class Running:
    name: str
    port: int
    pid: int  # the process whose RSS is the server's (daemon modes)
    stop: object  # () -> None
    groups: tuple[int, ...] = ()  # process groups whose CPU time is the system's


class Processes:
    """Everything started, so that one call stops it all (also after Ctrl-C)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.postfixes: list[PostfixDovecot] = []

    def spawn(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as f:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=f,
                env=env(),
                cwd=ROOT,
                start_new_session=True,  # its own process group: one killpg stops it all
            )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass
        # tcpserver's children and anything else left in the group
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)
        for pf in self.postfixes:
            pf.stop()
        self.postfixes.clear()


def ofmipd_args(
    ws: Workspace, delivery: str, name: str, auth: list[str], port: int, extra: Sequence[str] = ()
) -> list[str]:
    tls = ["--tls", "optional", "--ssl-cert", str(ws.cert), "--ssl-key", str(ws.key)]
    return [
        PYTHON, "-m", "ofmipd", "-p", f"127.0.0.1:{port}", "-C", CONNECTIONS,
        "--hostname", "ofmipd.bench", "--config", str(ws.config), *auth,
        *ws.delivery_args(delivery, name), *tls, *ws.state_args(name), *extra,
    ]  # fmt: skip


def ofmipd_one_args(ws: Workspace, delivery: str, name: str, auth: list[str]) -> list[str]:
    """`ofmipd -1` as tcpserver or a socketpair runs it: no listener, no slots, and no
    --config (its only setting, max_per_ip, is the daemon's), like the bare script."""
    tls = ["--tls", "optional", "--ssl-cert", str(ws.cert), "--ssl-key", str(ws.key)]
    return [
        PYTHON, "-m", "ofmipd", "--hostname", "ofmipd.bench", *auth,
        *ws.delivery_args(delivery, name), *tls, *ws.state_args(name), "-1",
    ]  # fmt: skip


def bare_args(ws: Workspace, delivery: str, name: str) -> list[str]:
    return [
        PYTHON, BARE, "--users", str(ws.users), *ws.delivery_args(delivery, name),
        "--cert", str(ws.cert), "--key", str(ws.key),
    ]  # fmt: skip


def tcpserver(port: int, argv: list[str]) -> list[str]:
    # -R -H: no ident or DNS lookups; -l 0: no local name lookup; -c: concurrent children
    return ["tcpserver", "-R", "-H", "-l", "0", "-c", CONNECTIONS, "-b", "100",
            "127.0.0.1", str(port), *argv]  # fmt: skip


QUOTA = "user-messages:1000000/1h"  # never reached: the cost of the check and the charge

SYSTEMS = (
    "ofmipd",
    "ofmipd-workers2",
    "ofmipd-htpasswd",
    "ofmipd-quota",
    "bare-aiosmtpd",
    "postfix-dovecot",
    "ofmipd-1-tcpserver",
    "bare-1-tcpserver",
)
TCPSERVER_SYSTEMS = ("ofmipd-1-tcpserver", "bare-1-tcpserver")


def start(procs: Processes, ws: Workspace, system: str, delivery: str) -> Running:
    port = free_port()
    name = f"{system}-{delivery}"
    log = ws.logs / f"{name}.log"
    if system == "postfix-dovecot":
        pf = PostfixDovecot(
            ws.root / f"postfix-{port}", port, load.USER, load.PASSWORD, ws.cert, ws.key
        )
        procs.postfixes.append(pf)
        pf.start()
        wait_for_port(port, None, log)
        master = pf.master_pid() or 0
        dovecot = pf.dovecot.pid if pf.dovecot else 0
        return Running(system, port, master, pf.stop, (master, dovecot))
    if system == "ofmipd":
        argv = ofmipd_args(ws, delivery, name, ["-a", str(ws.users)], port)
    elif system == "ofmipd-workers2":
        argv = ofmipd_args(ws, delivery, name, ["-a", str(ws.users)], port, ["--workers", "2"])
    elif system == "ofmipd-quota":  # issue 15: one quota on must cost nothing noticeable
        extra = ["--quota", QUOTA]
        argv = ofmipd_args(ws, delivery, name, ["-a", str(ws.users)], port, extra)
    elif system == "ofmipd-htpasswd":
        argv = ofmipd_args(ws, delivery, name, ["--htpasswd", str(ws.htpasswd)], port)
    elif system == "bare-aiosmtpd":
        argv = [*bare_args(ws, delivery, name), "--listen", f"127.0.0.1:{port}"]
    elif system == "ofmipd-1-tcpserver":
        argv = tcpserver(port, ofmipd_one_args(ws, delivery, name, ["-a", str(ws.users)]))
    elif system == "bare-1-tcpserver":
        argv = tcpserver(port, [*bare_args(ws, delivery, name), "-1"])
    else:
        raise ValueError(system)
    proc = procs.spawn(argv, log)
    try:
        wait_for_port(port, proc, log)
    except Exception:
        procs.stop(proc)
        raise
    return Running(system, port, proc.pid, lambda: procs.stop(proc), (proc.pid,))


def start_custom(
    procs: Processes, ws: Workspace, name: str, argv_for_port: Callable[[int], list[str]]
) -> Running:
    """A system with an argv built from a free port (for the side measurements)."""
    port = free_port()
    log = ws.logs / f"{name}.log"
    proc = procs.spawn(argv_for_port(port), log)
    try:
        wait_for_port(port, proc, log)
    except Exception:
        procs.stop(proc)
        raise
    return Running(name, port, proc.pid, lambda: procs.stop(proc))
