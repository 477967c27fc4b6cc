"""A private Postfix submission service with Dovecot SASL, both in one temp dir.

Postfix: its own config_directory, queue_directory and data_directory; master.cf has
only the submission smtpd on a free loopback port plus the internal services a queued
message needs; every message is queued (cleanup fsyncs the queue file) and then
discarded by the discard transport. Nothing is chrooted, so smtpd reaches Dovecot's
auth socket by absolute path. Dovecot: no protocols, only the auth service with a
client socket in the temp dir and a passwd-file with {PLAIN} passwords.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

POSTFIX = "/usr/sbin/postfix"
DOVECOT = "/usr/sbin/dovecot"

# service type private unpriv chroot wakeup maxproc command
INTERNAL = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
discard   unix  -       -       n       -       -       discard
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def private_main_cf(etc: Path, root: Path, name: str) -> str:
    """main.cf's first part for a private Postfix: its own directories under `root`,
    loopback only, logging to `root/maillog`, every message discarded once queued."""
    return f"""compatibility_level = 3.6
config_directory = {etc}
queue_directory = {root}/spool
data_directory = {root}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.{name}
mydomain = {name}
myorigin = $myhostname
mydestination =
relayhost =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
default_transport = discard:{name}
local_transport = discard:{name}
relay_transport = discard:{name}
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
smtpd_banner = $myhostname ESMTP Postfix
"""


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()}")


class PostfixDovecot:
    """start() brings both up; stop() takes both down (safe to call twice)."""

    def __init__(
        self, root: Path, port: int, user: str, password: str, cert: Path, key: Path
    ) -> None:
        self.root = root
        self.port = port
        self.etc = root / "etc"
        self.dovecot_dir = root / "dovecot"
        self.auth_socket = self.dovecot_dir / "run" / "auth-client"
        self.started_postfix = False
        self.dovecot: subprocess.Popen[bytes] | None = None
        self._configure(user, password, cert, key)

    def _configure(self, user: str, password: str, cert: Path, key: Path) -> None:
        root = self.root
        for sub in ("etc", "spool", "data", "dovecot/run", "dovecot/state"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)  # postfix's unprivileged daemons must reach their dirs
        (self.dovecot_dir / "passwd").write_text(f"{user}:{{PLAIN}}{password}\n")
        (self.dovecot_dir / "dovecot.conf").write_text(
            f"""base_dir = {self.dovecot_dir}/run
state_dir = {self.dovecot_dir}/state
instance_name = ofmipd-bench-{root.name}
log_path = {self.dovecot_dir}/dovecot.log
protocols =
listen = 127.0.0.1
ssl = no
default_login_user = dovenull
default_internal_user = dovecot
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {self.dovecot_dir}/passwd
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}}
service auth {{
  unix_listener auth-client {{
    mode = 0666
  }}
}}
"""
        )
        (self.etc / "main.cf").write_text(
            private_main_cf(self.etc, root, "bench")
            + f"""smtpd_sasl_auth_enable = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = {self.auth_socket}
smtpd_sasl_security_options = noanonymous
smtpd_tls_security_level = may
smtpd_tls_auth_only = no
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_relay_restrictions = permit_sasl_authenticated, reject
smtpd_recipient_restrictions = permit_sasl_authenticated, reject
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_peername_lookup = yes
biff = no
alias_maps =
alias_database =
"""
        )
        (self.etc / "master.cf").write_text(
            f"127.0.0.1:{self.port} inet n - n - - smtpd\n"
            "  -o syslog_name=postfix-bench/submission\n" + INTERNAL
        )
        shutil.copy("/etc/postfix/dynamicmaps.cf", self.etc / "dynamicmaps.cf")

    def start(self) -> None:
        log = open(self.dovecot_dir / "stderr.log", "wb")
        self.dovecot = subprocess.Popen(
            [DOVECOT, "-F", "-c", str(self.dovecot_dir / "dovecot.conf")],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + 30
        while not self.auth_socket.exists():
            if self.dovecot.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "dovecot did not start: "
                    + (self.dovecot_dir / "stderr.log").read_text(errors="replace")
                )
            time.sleep(0.05)
        _run([POSTFIX, "-c", str(self.etc), "set-permissions"])
        _run([POSTFIX, "-c", str(self.etc), "check"])
        _run([POSTFIX, "-c", str(self.etc), "start"])
        self.started_postfix = True

    def master_pid(self) -> int | None:
        try:
            return int((self.root / "spool" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        if self.started_postfix:
            self.started_postfix = False
            try:
                _run([POSTFIX, "-c", str(self.etc), "stop"])
            except (RuntimeError, subprocess.TimeoutExpired):
                pid = self.master_pid()
                if pid:
                    try:
                        os.kill(pid, 9)
                    except ProcessLookupError:
                        pass
        if self.dovecot is not None and self.dovecot.poll() is None:
            self.dovecot.terminate()
            try:
                self.dovecot.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.dovecot.pid, 9)
                self.dovecot.wait()
        self.dovecot = None
