"""Start real ofmipd processes for tests: a daemon on a free port, or one session."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROGS = ROOT / "tests" / "progs"
CAPTURE = str(PROGS / "capture-sendmail")


def ofmipd_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ofmipd", *args]


def private_state_dir() -> str:
    """A fresh state directory (removed at exit): guessing limits are on by default, and
    ofmipds sharing one would share lock-outs between unrelated tests."""
    path = tempfile.mkdtemp(prefix="ofmipd-state-")
    atexit.register(shutil.rmtree, path, True)
    return path


def server_env(**extra: str) -> dict[str, str]:
    """The environment of an ofmipd under test: this checkout's code and a private state
    directory (pass STATE_DIRECTORY to share one between processes)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env["STATE_DIRECTORY"] = private_state_dir()
    env.update(extra)
    return env


def wait_for_port(
    host: str, port: int, proc: subprocess.Popen | None = None, timeout: float = 20.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"server exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}"
            )
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port}")


class Daemon:
    """ofmipd in daemon mode as a child process; stderr goes to a log file."""

    def __init__(
        self,
        args: list[str],
        port: int,
        workdir: Path,
        host: str = "127.0.0.1",
        env: dict[str, str] | None = None,
    ) -> None:
        self.host, self.port, self.workdir = host, port, workdir
        self.log_path = workdir / f"ofmipd-{port}.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            ofmipd_command(*args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
            env=env or server_env(),
            start_new_session=True,
        )
        try:
            wait_for_port(host, port, self.proc)
            if not {"-b", "--background", "--syslog"} & set(args):
                self.wait_for_log("ready on")  # start-up lines are written after the bind
        except (RuntimeError, OSError):  # what wait_for_port and wait_for_log raise
            self.stop()
            raise RuntimeError(f"ofmipd did not start: {self.log_text()}") from None

    def wait_for_log(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no {text!r} in the log")
            time.sleep(0.02)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def authfile(tmp_path: Path, text: str) -> Path:
    """An authfile (`user:password` lines) as ofmipd wants it: mode 0600."""
    path = tmp_path / "users"
    path.write_text(text)
    path.chmod(0o600)
    return path


def start_daemon(tmp_path: Path, users: Path, capture: Path, *args: str) -> Daemon:
    """A daemon on a free port: the authfile `users`, the capture injector, and `args`."""
    from tests.conftest import free_port

    port = free_port()
    return Daemon(
        ["-p", f"127.0.0.1:{port}", "--hostname", "mx.test", "-a", str(users),
         "--sendmail", CAPTURE, *args],
        port, tmp_path, env=server_env(CAPTURE_DIR=str(capture)),
    )  # fmt: skip


def captured_messages(capture_dir: Path) -> list[tuple[str, bytes]]:
    """(environment text, message bytes) for each message the capture program accepted."""
    out = []
    for msg in sorted(capture_dir.glob("*.msg")):
        env = msg.with_suffix(".env").read_text()
        out.append((env, msg.read_bytes()))
    return out
