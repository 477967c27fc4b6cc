"""Helpers for the deployment-recipe tests: copy conf/ recipes with test paths, run launchers.

A recipe is used as shipped except for the exact strings a test replaces (paths, ports,
the user); instantiate() fails if one of them is missing, so a recipe that drifts from
its test fails instead of silently testing something else.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.ofmipd_server import CAPTURE, ROOT

CONF = ROOT / "conf"
USER = "alice"
PASSWORD = "S3cret-Deploy"
RECIPIENT = "bob@example.net"
SENDER = "alice@example.org"

# Paths as the recipes name them, and what the tests put in their place.
OFMIPD_PATH = "/usr/local/sbin/ofmipd"
SENDMAIL_PATH = "/usr/sbin/sendmail"
CHECKPW_PATH = "/usr/bin/checkpw"
USERS_PATH = "/etc/ofmipd/users"
HOSTNAME = "mail.example.org"


def instantiate(relative: str, replacements: Mapping[str, str]) -> str:
    """conf/RELATIVE with each key replaced by its value; every key must occur."""
    text = (CONF / relative).read_text()
    for old, new in replacements.items():
        assert old in text, f"conf/{relative} no longer contains {old!r}"
        text = text.replace(old, new)
    return text


def unit_values(text: str, key: str) -> list[str]:
    """Every value of KEY= in a systemd unit (continuation lines are not used in ours)."""
    values = []
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == key and not line.lstrip().startswith(("#", ";")):
            values.append(value.strip())
    return values


def exec_start(relative: str, replacements: Mapping[str, str]) -> list[str]:
    """The one ExecStart= of a unit as argv, after replacing paths and addresses."""
    (line,) = unit_values(instantiate(relative, replacements), "ExecStart")
    return shlex.split(line)


class Workspace:
    """Test stand-ins for the programs and files the recipes name, in one directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.capture = root / "capture"
        self.capture.mkdir()
        # The state directory where systemd's StateDirectory= would put it (the launcher
        # may clean the environment, so the default is built in; a test may set it).
        self.state = root / "state"
        self.ofmipd = self._script(
            "ofmipd",
            f': "${{STATE_DIRECTORY:={shlex.quote(str(self.state))}}}"; export STATE_DIRECTORY\n'
            f'PYTHONPATH={shlex.quote(str(ROOT))} exec {shlex.quote(_python())} -m ofmipd "$@"',
        )
        # The launcher may clean the environment: the capture directory is built in.
        self.sendmail = self._script(
            "sendmail",
            f'CAPTURE_DIR={shlex.quote(str(self.capture))} exec {shlex.quote(CAPTURE)} "$@"',
        )
        # A checkpassword program: accepts USER/PASSWORD, then runs its argument.
        self.checkpw = root / "checkpassword"
        self.checkpw.write_text(
            f"#!{_python()}\n"
            "import os, sys\n"
            "fields = os.read(3, 512).split(b'\\0')\n"
            f"if fields[:2] != [{USER.encode()!r}, {PASSWORD.encode()!r}]:\n"
            "    sys.exit(1)\n"
            "os.execvp(sys.argv[1], sys.argv[1:])\n"
        )
        self.checkpw.chmod(0o755)
        self.users = root / "users"
        self.users.write_text(f"{USER}:{PASSWORD}\n")
        self.users.chmod(0o600)
        self.processes: list[Launched] = []

    def _script(self, name: str, body: str) -> Path:
        path = self.root / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
        return path

    def replacements(self, **extra: str) -> dict[str, str]:
        """The usual path replacements plus EXTRA (exact recipe text -> test text)."""
        return {
            OFMIPD_PATH: str(self.ofmipd),
            SENDMAIL_PATH: str(self.sendmail),
            HOSTNAME: "mx.test",
            **extra,
        }

    def start(self, argv: Sequence[str], name: str, **kwargs: object) -> Launched:
        # The launcher's ofmipd keeps its state in self.state unless the test (or the
        # unit it plays) names another, not in the test process's own.
        env = {k: v for k, v in os.environ.items() if k != "STATE_DIRECTORY"}
        kwargs.setdefault("env", env)
        launched = Launched(argv, self.root / f"{name}.log", **kwargs)
        self.processes.append(launched)
        return launched

    def messages(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.capture.glob("*.msg"))]

    def close(self) -> None:
        for launched in reversed(self.processes):
            launched.stop()


def _python() -> str:
    import sys

    return sys.executable


class Launched:
    """A launcher (xinetd, tcpserver, ...) in its own process group, output to a log."""

    def __init__(self, argv: Sequence[str], log: Path, **kwargs: object) -> None:
        self.log_path = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **kwargs,  # type: ignore[call-overload]
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        try:  # children left behind in the group (sessions still running)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for_banner(
    host: str, port: int, launched: Launched | None = None, timeout: float = 30.0
) -> None:
    """Poll until HOST:PORT answers (any bytes or a clean accept) or the launcher died."""
    deadline = time.monotonic() + timeout
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while time.monotonic() < deadline:
        if launched is not None and launched.proc.poll() is not None:
            raise RuntimeError(f"launcher exited {launched.proc.returncode}: {launched.log()}")
        try:
            with socket.socket(family) as sock:
                sock.settimeout(2)
                sock.connect((host, port))
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {host}:{port}")


def wait_for_pidfile(path: Path, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            text = path.read_text().split()
        except FileNotFoundError:
            text = []
        if text:
            return int(text[0])
        time.sleep(0.05)
    raise TimeoutError(f"no pid in {path}")


def make_certificate(directory: Path, name: str = "mx.test") -> tuple[Path, Path, Path]:
    """A self-signed P-256 certificate: (cert, key, cert+key in one file)."""
    cert, key, both = directory / "cert.pem", directory / "key.pem", directory / "both.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}"]
        + ["-days", "2", "-addext", f"subjectAltName=DNS:{name}"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    both.write_bytes(key.read_bytes() + cert.read_bytes())
    both.chmod(0o600)
    return cert, key, both


def msmtp(
    workdir: Path,
    port: int,
    *,
    host: str = "127.0.0.1",
    source_ip: str | None = None,
    tls: str = "starttls",  # "starttls", "implicit" or "off"
    trust: Path | None = None,
    auth: bool = True,
    password: str = PASSWORD,
    subject: str = "deploy test",
) -> subprocess.CompletedProcess[str]:
    """Send one message with msmtp; returns the finished process (returncode, output)."""
    lines = [
        "account test",
        f"host {host}",
        f"port {port}",
        "domain mua.test",
        f"from {SENDER}",
        f"tls {'off' if tls == 'off' else 'on'}",
        f"tls_starttls {'on' if tls == 'starttls' else 'off'}",
    ]
    if source_ip:
        lines.append(f"source_ip {source_ip}")
    if trust is not None:
        lines += [f"tls_trust_file {trust}", "tls_host_override mx.test"]
    elif tls != "off":
        lines.append("tls_certcheck off")
    if auth:
        lines += ["auth plain", f"user {USER}", f"password {password}"]
    else:
        lines.append("auth off")
    lines.append("account default : test")
    rc = workdir / f"msmtprc-{port}-{tls}"
    rc.write_text("\n".join(lines) + "\n")
    rc.chmod(0o600)
    return subprocess.run(
        ["msmtp", "-C", str(rc), "-d", RECIPIENT],
        input=f"Subject: {subject}\n\nsent through a recipe\n",
        capture_output=True,
        text=True,
        timeout=60,
    )


def swaks(port: int, *args: str, source_ip: str = "127.0.0.1") -> str:
    """A plaintext swaks session from SOURCE_IP; returns its transcript."""
    done = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{port}", "--local-interface", source_ip]
        + ["--helo", "mua.test", "--from", SENDER, "--to", RECIPIENT, "--timeout", "30", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout + done.stderr


def received(message: bytes) -> str:
    """The Received header ofmipd added (the message's first field, unfolded)."""
    head = message.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0].decode()
    first = head.split("\n")
    field = [first[0]]
    for line in first[1:]:
        if not line[:1].isspace():
            break
        field.append(line.strip())
    return " ".join(part.strip() for part in field)
