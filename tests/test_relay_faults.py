"""No loss and no duplicate while the downstream MTA stops and starts mid-run: every
message either got 250 and Postfix delivered it exactly once, or got a 4xx and Postfix
never saw it, except where ofmipd logged that the MTA went away after the whole message
was sent (it may have queued it: RFC 1047's window, which no SMTP client can close)."""

from __future__ import annotations

import re
import shutil
import smtplib
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.ofmipd_server import Daemon, authfile, server_env
from tests.postfix_server import Postfix

MESSAGES = 1000  # as the issue asks
CLIENTS = 4


def send_all(daemon: Daemon, numbers: list[int], outcomes: dict[int, int]) -> None:
    smtp: smtplib.SMTP | None = None
    for n in numbers:
        try:
            if smtp is None:
                smtp = smtplib.SMTP(daemon.host, daemon.port, timeout=60)
                smtp.login("alice", "secret")
            code, _ = smtp.mail("alice@example.com")
            if code == 250:
                code, _ = smtp.rcpt(f"m{n}@example.org")
            if code == 250:
                try:
                    code, _ = smtp.data(f"Subject: {n}\r\n\r\nmessage {n}\r\n".encode())
                except smtplib.SMTPDataError as refused:  # DATA goes down before the 354
                    code = refused.smtp_code
            if code != 250:
                smtp.rset()
            outcomes[n] = code
        except smtplib.SMTPException:
            outcomes[n] = 0  # no reply at all: ofmipd must never do that
            smtp = None


@pytest.mark.slow
def test_stopping_and_starting_the_mta_twice_loses_and_duplicates_nothing(
    tmp_path: Path,
) -> None:
    root = Path(tempfile.mkdtemp(prefix="ofmipd-postfix-"))
    postfix = Postfix(root, free_port())
    postfix.start()
    outcomes: dict[int, int] = {}
    try:
        users = authfile(tmp_path, "alice:secret\n")
        port = free_port()
        args = ["-p", f"127.0.0.1:{port}", "-a", str(users), "--relay",
                f"smtp://127.0.0.1:{postfix.port}", "--max-errors", "100000", "-L"]  # fmt: skip
        with Daemon(args, port, tmp_path, env=server_env()) as daemon:
            threads = [
                threading.Thread(
                    target=send_all, args=(daemon, list(range(c, MESSAGES, CLIENTS)), outcomes)
                )
                for c in range(CLIENTS)
            ]
            for thread in threads:
                thread.start()
            for fraction in (1 / 3, 2 / 3):
                while len(outcomes) < MESSAGES * fraction and any(t.is_alive() for t in threads):
                    time.sleep(0.01)
                postfix.stop()
                time.sleep(0.3)
                postfix.start()
            for thread in threads:
                thread.join(120)
            relay_log = [
                x for x in daemon.log_text().splitlines() if "relay" in x and "250" not in x
            ]
        accepted = {n for n, code in outcomes.items() if code == 250}
        assert len(outcomes) == MESSAGES
        assert all(code == 250 or 400 <= code < 500 for code in outcomes.values()), outcomes
        assert MESSAGES - len(accepted) > 0  # the restarts did refuse some
        postfix.flush()  # a stop mid-delivery deferred some: Postfix has them, queued

        def sent() -> Counter[int]:
            found = re.finditer(r"to=<m(\d+)@example\.org>.*status=sent", postfix.maillog())
            return Counter(int(match.group(1)) for match in found)

        deadline = time.monotonic() + 60
        while not accepted <= set(sent()) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)  # anything duplicated would show up by now
        delivered = sent()
        # A message whose reply was lost after its final dot (the MTA killed between
        # queueing it and answering: RFC 1047) may be queued although the client heard
        # 451; ofmipd logs each such case as OUTCOME UNKNOWN. Every other 4xx is nowhere.
        unknown = sum("OUTCOME UNKNOWN" in line for line in relay_log)
        assert accepted <= set(delivered), sorted(accepted - set(delivered))
        extra = set(delivered) - accepted
        assert len(extra) <= unknown, (extra, unknown)
        assert max(delivered.values()) == 1
    finally:
        postfix.stop()
        shutil.rmtree(root, ignore_errors=True)
