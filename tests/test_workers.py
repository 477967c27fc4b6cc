"""--workers: several processes serve one listening socket; signals reach them all."""

from __future__ import annotations

import re
import signal
import smtplib
import subprocess
import time

from tests.conftest import free_port
from tests.ofmipd_server import CAPTURE, Daemon, captured_messages, server_env


def test_two_workers_share_the_socket_reload_and_stop_together(tmp_path):
    users = tmp_path / "users"
    users.write_text("wes:wes-pw\n")
    users.chmod(0o600)
    capture = tmp_path / "capture"
    capture.mkdir()
    port = free_port()
    daemon = Daemon(
        [
            "-p",
            f"127.0.0.1:{port}",
            "--workers",
            "2",
            "-C",
            "1",
            "-a",
            str(users),
            "--sendmail",
            CAPTURE,
        ],
        port,
        tmp_path,
        env=server_env(CAPTURE_DIR=str(capture)),
    )
    try:
        deadline = time.monotonic() + 20
        while daemon.log_text().count("ready on") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        children = subprocess.run(
            ["pgrep", "-P", str(daemon.proc.pid)], capture_output=True, text=True
        ).stdout.split()
        assert len(children) == 2
        # With -C 1 per worker, two sessions open at once must be in different workers.
        first = smtplib.SMTP(daemon.host, port, timeout=20)
        second = smtplib.SMTP(daemon.host, port, timeout=20)
        for n, s in enumerate((first, second, first, second)):
            if n < 2:
                s.login("wes", "wes-pw")
            s.sendmail("wes@example.org", ["x@example.net"], f"Subject: {n}\r\n\r\nhi\r\n")
        first.quit()
        second.quit()
        daemon.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while daemon.log_text().count("configuration reloaded") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert daemon.log_text().count("configuration reloaded") == 2
    finally:
        code = daemon.stop()
    assert code == 0
    assert len(captured_messages(capture)) == 4
    served_by = set(re.findall(r"ofmipd\[(\d+)\]: INFO session \w+: end", daemon.log_text()))
    assert served_by == set(children)  # both workers took connections
    assert subprocess.run(["pgrep", "-P", str(daemon.proc.pid)]).returncode == 1
