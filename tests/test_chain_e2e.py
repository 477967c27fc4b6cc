"""The authenticator chain through a real daemon: checkpassword, then LDAP, then an authfile;
and PAM's failure delay hitting only the failing sessions."""

from __future__ import annotations

import base64
import secrets
import smtplib
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests import ldap_server
from tests.conftest import free_port
from tests.ofmipd_server import CAPTURE, Daemon, server_env

slapd = ldap_server.slapd


def login(daemon: Daemon, user: str, password: str) -> int:
    blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    with smtplib.SMTP(daemon.host, daemon.port, timeout=30) as s:
        s.ehlo("chain.test")
        return s.docmd("AUTH", f"PLAIN {blob}")[0]


@pytest.fixture
def chain_daemon(tmp_path, slapd):
    users = tmp_path / "users"
    users.write_text("fileonly:file-pw\nalice:alice-file-pw\n")
    users.chmod(0o600)
    capture = tmp_path / "capture"
    capture.mkdir()
    port = free_port()
    template = f"uid=%s,{ldap_server.PEOPLE}"
    daemon = Daemon(
        [
            "-p",
            f"127.0.0.1:{port}",
            "-A",
            "test -z checkpassword-says-no; exit 1",
            "-R",
            f"{slapd.uri}/{template}",
            "-a",
            str(users),
            "--sendmail",
            CAPTURE,
        ],
        port,
        tmp_path,
        env=server_env(CAPTURE_DIR=str(capture)),
    )
    yield daemon
    daemon.stop()


def test_user_known_only_to_last_backend_is_accepted(chain_daemon):
    assert login(chain_daemon, "fileonly", "file-pw") == 235


def test_ldap_user_is_accepted_and_wrong_everywhere_is_535(chain_daemon):
    assert login(chain_daemon, "alice", "alice-pw") == 235
    assert login(chain_daemon, "alice", "nobody-has-this") == 535


@pytest.mark.slow
def test_ldap_down_means_try_later_unless_a_later_backend_accepts(chain_daemon, slapd):
    slapd.stop()
    assert login(chain_daemon, "alice", "nobody-has-this") == 454
    assert login(chain_daemon, "alice", "alice-file-pw") == 235
    slapd.start()
    assert login(chain_daemon, "alice", "alice-pw") == 235  # no restart of ofmipd needed


@pytest.fixture
def pam_user():
    name = f"ofmchain_{secrets.token_hex(3)}"
    password = f"pam-{secrets.token_hex(6)}"
    subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", name], check=True)
    subprocess.run(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True)
    service = Path("/etc/pam.d") / f"ofmipd-chain-{secrets.token_hex(3)}"
    service.write_text(
        "auth optional pam_faildelay.so delay=2000000\n"
        "auth required pam_unix.so nodelay\n"
        "account required pam_unix.so\n"
    )
    yield name, password, service.name
    service.unlink(missing_ok=True)
    subprocess.run(["userdel", "-f", name], capture_output=True)


@pytest.mark.slow
def test_failing_pam_logins_do_not_hold_up_a_good_one(tmp_path, pam_user):
    name, password, service = pam_user
    port = free_port()
    daemon = Daemon(
        ["-p", f"127.0.0.1:{port}", "-m", service, "--sendmail", CAPTURE], port, tmp_path
    )
    try:
        results: list[int] = []
        failing = [
            threading.Thread(target=lambda: results.append(login(daemon, name, "bad")))
            for _ in range(3)
        ]
        for thread in failing:
            thread.start()
        time.sleep(0.3)  # the three are now sleeping in pam_faildelay
        started = time.perf_counter()
        good = login(daemon, name, password)  # banner + EHLO + AUTH
        elapsed = time.perf_counter() - started
        failing_still_running = any(t.is_alive() for t in failing)
        for thread in failing:
            thread.join()
    finally:
        daemon.stop()
    assert good == 235
    assert failing_still_running
    assert results == [535, 535, 535]
    assert elapsed < 1.0, elapsed
