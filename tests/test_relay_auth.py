"""--relay-auth against a real smarthost that requires it: Postfix with Dovecot SASL
(bench/postfix.py), relaying only for authenticated clients."""

from __future__ import annotations

import re
import shutil
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.postfix import PostfixDovecot
from tests.conftest import free_port
from tests.ofmipd_server import Daemon, authfile, ofmipd_command, server_env
from tests.tls_support import make_certificate

SMARTHOST_USER, SMARTHOST_PASSWORD = "relayuser", "s3cret-relay"

pytestmark = pytest.mark.slow  # Postfix and Dovecot start for this module: about 4 s


@pytest.fixture(scope="module")
def smarthost() -> Iterator[PostfixDovecot]:
    root = Path(tempfile.mkdtemp(prefix="ofmipd-smarthost-"))  # not under a 0700 tmp_path
    root.chmod(0o755)
    cert, key = make_certificate(root)
    server = PostfixDovecot(root, free_port(), SMARTHOST_USER, SMARTHOST_PASSWORD, cert, key)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def daemon_with_login(tmp_path: Path, smarthost: PostfixDovecot, password: str) -> Daemon:
    secret = tmp_path / "relay-password"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    users = authfile(tmp_path, "alice:secret\n")
    port = free_port()
    return Daemon(
        ["-p", f"127.0.0.1:{port}", "-a", str(users), "-L",
         "--relay", f"smtp://127.0.0.1:{smarthost.port}",
         "--relay-auth", f"{SMARTHOST_USER}:{secret}"],
        port, tmp_path, env=server_env(),
    )  # fmt: skip


def test_relay_logs_in_to_the_smarthost_over_starttls(
    tmp_path: Path, smarthost: PostfixDovecot
) -> None:
    with daemon_with_login(tmp_path, smarthost, SMARTHOST_PASSWORD) as daemon:
        smtp = smtplib.SMTP(daemon.host, daemon.port, timeout=30)
        smtp.login("alice", "secret")
        assert (
            smtp.sendmail("alice@example.com", ["pat@example.org"], b"Subject: a\r\n\r\nb\r\n")
            == {}
        )
        smtp.quit()
    maillog = (smarthost.root / "maillog").read_text()
    assert f"sasl_method=PLAIN, sasl_username={SMARTHOST_USER}" in maillog
    deadline = time.monotonic() + 10
    while not re.search(r"disconnect from .* starttls=1 auth=1 ", maillog):
        assert time.monotonic() < deadline, maillog  # the pool closes it when ofmipd stops
        time.sleep(0.05)
        maillog = (smarthost.root / "maillog").read_text()
    assert SMARTHOST_PASSWORD not in daemon.log_text()


def test_a_refused_login_is_a_4xx_and_the_password_stays_out_of_the_log(
    tmp_path: Path, smarthost: PostfixDovecot
) -> None:
    with daemon_with_login(tmp_path, smarthost, "wrong-password") as daemon:
        smtp = smtplib.SMTP(daemon.host, daemon.port, timeout=30)
        smtp.login("alice", "secret")
        code, reply = smtp.mail("alice@example.com")
        smtp.quit()
    assert code == 451 and reply.startswith(b"4.4.0")
    assert f"AUTH as {SMARTHOST_USER} refused: 535" in daemon.log_text()
    assert "wrong-password" not in daemon.log_text()


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--relay-auth", "u:/nonexistent"], "--relay-auth: /nonexistent: No such file"),
        (["--relay-auth", "nouser"], "expected USER:PASSWORD-FILE"),
        (["--relay-auth", "u:/etc/hostname", "--relay-tls", "none"], "--relay-auth needs TLS"),
    ],
)
def test_bad_relay_auth_is_one_line_and_exit_2(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    users = authfile(tmp_path, "alice:secret\n")
    result = subprocess.run(
        ofmipd_command("-a", str(users), "--check-config", "--relay", "smtp://127.0.0.1", *args),
        capture_output=True, text=True, env=server_env(), timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1
