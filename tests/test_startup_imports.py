"""`ofmipd -1` starts once per connection: guard what it imports, without timing anything.

A one-session process pays for every module and every dataclass it creates before the
banner (a frozen dataclass costs ~1 ms to define, the dataclasses module more). These
tests fail when one of the avoided modules creeps back onto the -1 path; speed itself
is measured in bench/, not here.
"""

from __future__ import annotations

import base64
import socket
import subprocess
import sys

from tests.ofmipd_server import ROOT, ofmipd_command, server_env
from tests.tls_support import make_certificate

# Not needed by a one-session process: dataclasses (records are NamedTuples), the daemon's
# listeners and the metrics exporter, shutil (argparse's terminal width), secrets.
AVOIDED = ("dataclasses", "ofmipd.listeners", "ofmipd.metrics", "shutil", "secrets")
PASSWORD = "Startup-Secret-3"


def write_users(tmp_path):
    users = tmp_path / "users"
    users.write_text(f"erin:{PASSWORD}\n")
    users.chmod(0o600)
    return users


def test_building_a_one_session_app_imports_nothing_avoidable(tmp_path) -> None:
    users = write_users(tmp_path)
    code = f"""
import sys
from ofmipd import cli, stdio
from ofmipd.assemble import build_app
args = cli.build_parser().parse_args(
    ["-1", "-a", {str(users)!r}, "--maildir", {str(tmp_path / "Maildir")!r}]
)
app = build_app(cli.config_from_args(args))
assert app.config.one_session and not app.metrics.enabled
print(",".join(m for m in {(*AVOIDED, "tomllib")!r} if m in sys.modules))
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"imported on the -1 path: {result.stdout.strip()}"


def imported_modules(importtime_output: str) -> set[str]:
    """Module names from `python -X importtime` lines ("import time: SELF | CUM | NAME")."""
    names = set()
    for line in importtime_output.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def test_a_whole_one_session_with_tls_and_toml_imports_nothing_avoidable(tmp_path) -> None:
    """The real process, as tcpserver would run it: start-up, AUTH, DATA into a Maildir."""
    users = write_users(tmp_path)
    cert, key = make_certificate(tmp_path)
    config = tmp_path / "ofmipd.toml"
    config.write_text("max_recipients = 10\n")
    maildir = tmp_path / "Maildir"
    command = ofmipd_command(
        "-1", "--hostname", "mx.test", "--config", str(config), "-a", str(users),
        "--maildir", str(maildir), "--tls", "optional", "--ssl-cert", str(cert),
        "--ssl-key", str(key),
    )  # fmt: skip
    command.insert(1, "-X")
    command.insert(2, "importtime")
    ours, theirs = socket.socketpair()
    with ours:
        proc = subprocess.Popen(
            command, stdin=theirs, stdout=theirs, stderr=subprocess.PIPE, env=server_env()
        )
        theirs.close()
        ours.settimeout(60)
        replies = ours.makefile("rb")

        def reply() -> bytes:
            lines = [replies.readline()]
            while lines[-1][3:4] == b"-":
                lines.append(replies.readline())
            return lines[-1]

        plain = base64.b64encode(f"\0erin\0{PASSWORD}".encode()).decode()
        assert reply().startswith(b"220 ")
        for command_line, expected in (
            ("EHLO client.test", b"250 "),
            (f"AUTH PLAIN {plain}", b"235 "),
            ("MAIL FROM:<erin@example.org>", b"250 "),
            ("RCPT TO:<frank@example.net>", b"250 "),
            ("DATA", b"354 "),
            ("Subject: startup\r\n\r\nhello\r\n.", b"250 "),
            ("QUIT", b"221 "),
        ):
            ours.sendall(command_line.encode() + b"\r\n")
            assert reply().startswith(expected), command_line[:4]
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert len(list((maildir / "new").iterdir())) == 1
    imported = imported_modules(stderr.decode(errors="replace"))
    assert {"ofmipd.stdio", "ofmipd.tls", "tomllib"} <= imported  # the output was parsed
    assert not imported & set(AVOIDED), sorted(imported & set(AVOIDED))
