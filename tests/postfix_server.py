"""A private real Postfix for the relay tests: the downstream MTA behind `--relay`.

Like bench/postfix.py (own config_directory, queue_directory and data_directory, no
chroot, the discard transport after cleanup has fsynced the queue file) but without
SASL: its smtpd on a free loopback port trusts 127.0.0.1 for XCLIENT and XFORWARD,
logs to `maillog` in its directory (postlogd), and refuses any recipient listed in
`refused` (a texthash map) at RCPT time, so downstream replies can be tested. With
`keep`, a message to a recipient @kept.test goes through a pipe transport into
kept/QUEUEID instead (as Postfix hands it on: its own Received first, LF line endings).
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.postfix import INTERNAL, POSTFIX, _run, private_main_cf
from tests.ofmipd_server import Daemon, authfile, server_env
from tests.ports import free_port

REFUSED_REPLY = "550 5.1.1 no such user here"


class Postfix:
    """start(), stop() (safe twice), restart(); maillog() reads its log."""

    def __init__(
        self,
        root: Path,
        port: int,
        refused: tuple[str, ...] = (),
        identity: bool = True,
        smtps_port: int | None = None,
        extra_master: str = "",
        keep: bool = False,
        size_limit: int = 10240000,
    ) -> None:
        """With `smtps_port`, STARTTLS on `port` and implicit TLS there, with a certificate
        for "localhost" (self.cert) that a client may trust through SSL_CERT_FILE."""
        self.root = root
        self.port = port
        self.smtps_port = smtps_port
        self.etc = root / "etc"
        self.running = False
        for sub in ("etc", "spool", "data"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)  # postfix's unprivileged daemons must reach their dirs
        (self.etc / "refused").write_text("".join(f"{r} {REFUSED_REPLY}\n" for r in refused))
        main = ""  # settings before the common ones
        if keep:
            self.kept = root / "kept"
            self.kept.mkdir(exist_ok=True)
            os.chmod(self.kept, 0o777)  # the pipe runs as nobody
            save = root / "save"
            save.write_text(f'#!/bin/sh\nexec cat > {self.kept}/"$1"\n')
            save.chmod(0o755)
            (self.etc / "transport").write_text("kept.test keep:\n")
            main += f"transport_maps = texthash:{self.etc}/transport\n"
            extra_master += f"keep unix - n n - - pipe\n  user=nobody argv={save} ${{queue_id}}\n"
        if smtps_port is not None:
            from tests.tls_support import make_certificate

            self.cert, key = make_certificate(root, "localhost")
            main += (
                f"smtpd_tls_security_level = may\nsmtpd_tls_cert_file = {self.cert}\n"
                f"smtpd_tls_key_file = {key}\nsmtpd_tls_loglevel = 1\n"
            )
        (self.etc / "main.cf").write_text(
            main
            + private_main_cf(self.etc, root, "test")
            + f"""message_size_limit = {size_limit}
smtpd_authorized_xclient_hosts = {"127.0.0.1" if identity else ""}
smtpd_authorized_xforward_hosts = {"127.0.0.1" if identity else ""}
smtpd_relay_restrictions = check_recipient_access texthash:{self.etc}/refused,
    permit_mynetworks, reject
smtpd_recipient_restrictions =
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_peername_lookup = no
biff = no
alias_maps =
alias_database =
"""
        )
        smtps = ""
        if smtps_port is not None:
            smtps = (
                f"127.0.0.1:{smtps_port} inet n - n - - smtpd\n"
                "  -o syslog_name=postfix-test/smtps -o smtpd_tls_wrappermode=yes\n"
            )
        (self.etc / "master.cf").write_text(
            f"127.0.0.1:{port} inet n - n - - smtpd\n"
            "  -o syslog_name=postfix-test/downstream\n" + smtps + extra_master + INTERNAL
        )
        shutil.copy("/etc/postfix/dynamicmaps.cf", self.etc / "dynamicmaps.cf")
        _run([POSTFIX, "-c", str(self.etc), "set-permissions"])
        _run([POSTFIX, "-c", str(self.etc), "check"])

    def start(self) -> None:
        # `postfix start` runs postsuper, which logs as the postfix user (a restart after a
        # kill finds half-written queue files to warn about): a root-only maillog made that
        # fatal ("open logfile: Permission denied"). postlogd, as root, still appends.
        maillog = self.root / "maillog"
        maillog.touch()
        shutil.chown(maillog, "postfix", "postfix")
        _run([POSTFIX, "-c", str(self.etc), "start"])
        self.running = True
        deadline = time.monotonic() + 30
        while not self._listening():
            if time.monotonic() > deadline:
                raise RuntimeError(f"postfix did not listen on {self.port}")
            time.sleep(0.05)

    def _listening(self) -> bool:
        import socket

        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        try:
            _run([POSTFIX, "-c", str(self.etc), "stop"])
        except (RuntimeError, subprocess.TimeoutExpired):
            pid_file = self.root / "spool" / "pid" / "master.pid"
            try:
                os.kill(int(pid_file.read_text().split()[0]), 9)
            except (OSError, ValueError, IndexError):
                pass

    def flush(self) -> None:
        """Deliver what is deferred now: a stop mid-delivery defers a queued message."""
        _run(["/usr/sbin/postqueue", "-c", str(self.etc), "-f"])

    def maillog(self) -> str:
        try:
            return (self.root / "maillog").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, count: int = 1, timeout: float = 15) -> list[str]:
        """The log lines matching `pattern` once there are `count` of them."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.maillog().splitlines() if re.search(pattern, line)]
            if len(lines) >= count or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)


def running_postfix(**options: object) -> Iterator[Postfix]:
    """A started Postfix(root, free port, **options) for a module's fixture, removed after.
    Not under pytest's tmp_path: its 0700 parent keeps Postfix's daemons out."""
    root = Path(tempfile.mkdtemp(prefix="ofmipd-postfix-"))
    try:
        server = Postfix(root, free_port(), **options)  # type: ignore[arg-type]
        server.start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def relay_daemon(tmp_path: Path, postfix: Postfix, *args: str) -> Daemon:
    """ofmipd --relay to `postfix`, user alice with password "secret"."""
    users = authfile(tmp_path, "alice:secret\n")
    port = free_port()
    return Daemon(
        ["-p", f"127.0.0.1:{port}", "--hostname", "mx.test", "-a", str(users), "-L",
         "--relay", f"smtp://127.0.0.1:{postfix.port}", *args],
        port, tmp_path, env=server_env(),
    )  # fmt: skip


def login(daemon: Daemon, timeout: float = 60) -> smtplib.SMTP:
    smtp = smtplib.SMTP(daemon.host, daemon.port, local_hostname="client.example", timeout=timeout)
    smtp.login("alice", "secret")
    return smtp


def queue_id(reply: bytes) -> str:
    """Postfix's queue id in its 250 after DATA ("queued as ...")."""
    found = re.search(rb"queued as ([0-9A-Z]+)", reply)
    assert found, reply
    return found.group(1).decode()
