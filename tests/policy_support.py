"""Policy servers for the --policy tests: the real Debian daemons (postfwd,
policyd-rate-limit) on private ports with private configurations, and a tiny scripted
one for the faults the real daemons cannot be made to show (garbage, each access(5)
action, hostile attribute values)."""

from __future__ import annotations

import os
import signal
import smtplib
import socketserver
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import free_port
from tests.ofmipd_server import wait_for_port

Request = dict[str, str]


class ScriptedPolicy:
    """A policy server in a thread: `answer(request)` gives the raw reply bytes (None
    closes the connection). Every request and each new connection is recorded."""

    def __init__(self, answer: Callable[[Request], bytes | None]) -> None:
        self.answer = answer
        self.requests: list[Request] = []
        self.raw: list[bytes] = []
        self.connections = 0
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                outer.connections += 1
                while True:
                    lines = []
                    while True:
                        line = self.rfile.readline()
                        if not line:
                            return
                        if line == b"\n":
                            break
                        lines.append(line)
                    outer.raw.append(b"".join(lines))
                    request = {}
                    for line in lines:
                        name, _, value = line.decode("utf-8", "replace").rstrip("\n").partition("=")
                        request[name] = value
                    outer.requests.append(request)
                    reply = outer.answer(request)
                    if reply is None:
                        return
                    self.wfile.write(reply)
                    self.wfile.flush()

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.port = free_port()
        self.server = Server(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def service(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def states(self) -> list[str]:
        return [r.get("protocol_state", "") for r in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> ScriptedPolicy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def action(text: str) -> Callable[[Request], bytes]:
    """A server that answers `text` at RCPT and DUNNO otherwise."""

    def answer(request: Request) -> bytes:
        if request.get("protocol_state") == "RCPT":
            return f"action={text}\n\n".encode()
        return b"action=DUNNO\n\n"

    return answer


def dunno(request: Request) -> bytes:
    return b"action=DUNNO\n\n"


class Postfwd:
    """postfwd1 on a private port with a rules file; stopped (or killed) by its pid."""

    def __init__(self, workdir: Path, rules: str | Path) -> None:
        self.workdir = workdir
        if isinstance(rules, str):
            path = workdir / "postfwd.cf"
            path.write_text(rules)
            rules = path
        self.rules = rules
        self.port = free_port()
        self.pidfile = workdir / "postfwd.pid"
        self.pid: int | None = None

    @property
    def service(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def start(self) -> None:
        self.pidfile.unlink(missing_ok=True)
        # -d: postfwd1 forks into the background and writes its pid file. Never -L: its
        # log then goes to the policy connection itself.
        subprocess.run(
            ["postfwd1", "-d", "-f", str(self.rules), "-i", "127.0.0.1", "-p", str(self.port),
             "-u", "nobody", "-g", "nogroup", "--pidfile", str(self.pidfile)],
            check=True, timeout=30, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for_port("127.0.0.1", self.port)
        deadline = time.monotonic() + 10
        while not (self.pidfile.exists() and self.pidfile.read_text().strip()):
            assert time.monotonic() < deadline, "postfwd wrote no pid file"
            time.sleep(0.05)
        self.pid = int(self.pidfile.read_text().strip())

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.pid is None:
            return
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while _alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.pid = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie until init reaps it counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


class RateLimitDaemon:
    """policyd-rate-limit in the foreground with a private YAML configuration and
    sqlite file; it counts each RCPT of a login and answers its fail_action."""

    def __init__(self, workdir: Path, limit: int, window: int) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.config = workdir / "policyd-rate-limit.yaml"
        self.config.write_text(
            f"""debug: False
user: "root"
group: "root"
pidfile: "{workdir}/prl-run/policyd-rate-limit.pid"
backend: 0
sqlite_config:
    database: "{workdir}/prl-db/db.sqlite3"
SOCKET: ["127.0.0.1", {self.port}]
limits:
    - [{limit}, {window}]
limits_by_id: {{}}
limit_by_sasl: True
limit_by_sender: False
limit_by_ip: False
limited_networks: []
success_action: "dunno"
fail_action: "defer_if_permit Rate limit reach, retry later"
db_error_action: "dunno"
report: False
delay_to_close: 300
"""
        )
        self.log_path = workdir / "policyd-rate-limit.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def service(self) -> str:
        return f"inet:127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["policyd-rate-limit", "-f", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        wait_for_port("127.0.0.1", self.port, self.proc)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def send(
    smtp: smtplib.SMTP, sender: str, recipient: str, body: bytes = b"Subject: t\r\n\r\nhi\r\n"
) -> tuple[int, bytes]:
    """One message on a logged-in session: the first reply that was not 250 (and RSET),
    or DATA's 250."""
    code, text = smtp.mail(sender)
    if code == 250:
        code, text = smtp.rcpt(recipient)
    if code == 250:
        code, text = smtp.data(body)
    if code != 250:
        smtp.rset()
    return code, text
