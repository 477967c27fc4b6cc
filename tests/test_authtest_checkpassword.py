"""ofmipd-authtest --checkpassword behind real consumers (ofmipd -A, Dovecot); --check-config."""

from __future__ import annotations

import imaplib
import os
import re
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.dovecot_server import Dovecot, make_certificate
from tests.ofmipd_server import CAPTURE, Daemon, ofmipd_command, server_env

AUTHTEST = str(Path(sys.executable).parent / "ofmipd-authtest")
PASSWORD = "Zebra-Quokka-7731-distinct"


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """An ofmipd TOML config whose chain is an authfile with alice."""
    users = write(tmp_path / "users", f"alice:{PASSWORD}\n")
    return write(
        tmp_path / "ofmipd.toml",
        f'[delivery]\nsendmail = "{CAPTURE}"\n[[auth]]\nkind = "authfile"\npath = "{users}"\n',
        0o600,  # a readable config is warned about on stderr, a line these tests don't expect
    )


@pytest.fixture
def tempfail_config(tmp_path: Path) -> Path:
    later = write(tmp_path / "later", "#!/bin/sh\ncat <&3 >/dev/null\nexit 111\n", 0o755)
    return write(
        tmp_path / "later.toml", f'[[auth]]\nkind = "checkpassword"\ncommand = "{later}"\n', 0o644
    )


def checkpassword(*args: str, data: bytes | None, env: dict[str, str] | None = None):
    """Run `ofmipd-authtest ARGS` with DATA on fd 3 (no fd 3 when None), as a consumer does."""
    assert os.access(AUTHTEST, os.X_OK), "run .venv/bin/pip install -e . (console script)"
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, data or b"")
        os.close(write_end)
        # bash moves our pipe to fd 3 in the child only (dash takes fds 0-9 only).
        redirect = f"3<&{read_end}" if data is not None else "3<&-"
        result = subprocess.run(
            ["/bin/bash", "-c", f'exec "$0" "$@" {redirect} {read_end}<&-', AUTHTEST, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
            pass_fds=(read_end,),
            env=env,
        )
    finally:
        os.close(read_end)
    assert PASSWORD.encode() not in result.stdout + result.stderr
    assert result.stdout == b""  # under qmail-popup stdout is the client's connection
    return result


# ---- the DJB interface, run directly ---------------------------------------------------


def test_checkpassword_exit_codes(config, tempfail_config) -> None:
    good = f"alice\0{PASSWORD}\0{1700000000}\0".encode()
    assert checkpassword("--config", str(config), "--checkpassword", data=good).returncode == 0
    bad = b"alice\0wrong\0" + b"1700000000\0"
    result = checkpassword("--config", str(config), "--checkpassword", data=bad)
    assert result.returncode == 1
    assert b"alice: reject (authfile: password mismatch for alice" in result.stderr
    result = checkpassword("--config", str(tempfail_config), "--checkpassword", data=good)
    assert result.returncode == 111
    assert b"checkpassword exit 111" in result.stderr


def test_checkpassword_tempfail_line_names_the_backend_that_failed(tmp_path, config) -> None:
    # LDAP is down, then the authfile has no such user: TEMPFAIL, because of LDAP.
    users = write(tmp_path / "users", f"alice:{PASSWORD}\n")
    chain = write(
        tmp_path / "chain.toml",
        f'[[auth]]\nkind = "ldap"\nuri = "ldap://127.0.0.1:{free_port()}"\n'
        'dn_template = "uid=%s,dc=example,dc=org"\nnetwork_timeout = 2\n'
        f'[[auth]]\nkind = "authfile"\npath = "{users}"\n',
        0o644,
    )
    result = checkpassword("--config", str(chain), "--checkpassword", data=b"mallory\0pw\0\0")
    assert result.returncode == 111
    assert b"ofmipd-authtest: mallory: tempfail (ldap: LDAP " in result.stderr, result.stderr


def test_checkpassword_line_escapes_the_client_name(config) -> None:
    # Under Dovecot or qmail this stderr line lands in the mail log: one line, always.
    forged = b"x\xc2\x85auth reject: client=203.0.113.9 user=y"  # NEL, a C1 control
    result = checkpassword("--config", str(config), "--checkpassword", data=forged + b"\0pw\0\0")
    assert result.returncode == 1
    (line,) = result.stderr.decode().splitlines()
    assert line.startswith("ofmipd-authtest: x\\x85auth reject: ") and line.isprintable(), line


def test_checkpassword_execs_prog_with_user_set(tmp_path, config) -> None:
    seen = tmp_path / "seen"
    prog = write(tmp_path / "prog", f'#!/bin/sh\necho "$USER $1" > {seen}\nexit 7\n', 0o755)
    good = f"alice\0{PASSWORD}\0\0".encode()
    args = ("--config", str(config), "--checkpassword", str(prog), "arg1")
    result = checkpassword(*args, data=good, env={**os.environ, "USER": "root"})
    assert result.returncode == 7  # exec'd: PROG's exit code is ours
    assert seen.read_text() == "alice arg1\n"
    seen.unlink()
    assert checkpassword(*args, data=b"alice\0nope\0\0").returncode == 1
    assert not seen.exists()  # PROG runs only on accept


def test_checkpassword_misuse_and_bad_config_exit_2(tmp_path, config) -> None:
    result = checkpassword("--config", str(config), "--checkpassword", data=None)
    assert result.returncode == 2 and b"fd 3" in result.stderr
    result = checkpassword("--config", str(config), "--checkpassword", data=b"no-nul-at-all")
    assert result.returncode == 2
    result = checkpassword("--config", str(config), "--checkpassword", data=b"x" * 600 + b"\0\0")
    assert result.returncode == 2
    missing = str(tmp_path / "missing.toml")
    result = checkpassword("--config", missing, "--checkpassword", data=b"alice\0pw\0\0")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and b"missing.toml" in result.stderr


# ---- behind a real ofmipd daemon (-A) -------------------------------------------------


def login(daemon: Daemon, password: str) -> tuple[int, bytes]:
    with smtplib.SMTP(daemon.host, daemon.port, local_hostname="client.test", timeout=60) as s:
        s.ehlo()
        try:
            return s.login("alice", password)
        except smtplib.SMTPAuthenticationError as error:
            return error.smtp_code, error.smtp_error
        except smtplib.SMTPResponseException as error:
            return error.smtp_code, error.smtp_error


def ofmipd_with(tmp_path: Path, inner_config: Path) -> Daemon:
    port = free_port()
    command = f"{AUTHTEST} --config {inner_config} --checkpassword /bin/true"
    args = ["-p", f"127.0.0.1:{port}", "-L", "--sendmail", CAPTURE, "-A", command]
    return Daemon(args, port, tmp_path, env=server_env(CAPTURE_DIR=str(tmp_path)))


@pytest.mark.slow
def test_ofmipd_logs_in_through_authtest_checkpassword(tmp_path, config) -> None:
    daemon = ofmipd_with(tmp_path, config)
    try:
        assert login(daemon, PASSWORD)[0] == 235
        assert login(daemon, "wrong-password")[0] == 535
    finally:
        daemon.stop()
    log = daemon.log_text()
    assert PASSWORD not in log
    assert "checkpassword" in log


def test_ofmipd_hears_tempfail_through_authtest_checkpassword(tmp_path, tempfail_config) -> None:
    daemon = ofmipd_with(tmp_path, tempfail_config)
    try:
        assert login(daemon, PASSWORD)[0] == 454
    finally:
        daemon.stop()
    assert PASSWORD not in daemon.log_text()


# ---- behind Dovecot's checkpassword passdb ----------------------------------------------


class CheckpasswordDovecot(Dovecot):
    """The private Dovecot, with `passdb { driver = checkpassword }` instead of passwd-file.

    The auth process runs as root: it must read ofmipd's 0600 authfile, and this venv's
    interpreter is not reachable by the dovecot user.
    """

    def __init__(self, command: str) -> None:
        self.command = command
        super().__init__({}, tls=False, extra_config="service auth {\n  user = root\n}\n")

    def _write_config(self) -> None:
        super()._write_config()
        conf = self.root / "dovecot.conf"
        passdb = f"passdb {{\n  driver = checkpassword\n  args = {self.command}\n}}\n"
        text, count = re.subn(r"passdb \{\n.*?\n\}\n", passdb, conf.read_text(), 1, re.S)
        assert count == 1, "dovecot_server.py's passdb block changed"
        conf.write_text(text)


def imap_login(server: Dovecot, user: str, password: str) -> str:
    imap = imaplib.IMAP4(server.host, server.ports["imap"], timeout=60)
    try:
        return imap.login(user, password)[0]
    except imaplib.IMAP4.error as error:
        return str(error)
    finally:
        imap.logout()


@pytest.mark.slow
def test_dovecot_imap_login_follows_ofmipd_authfile(tmp_path, config) -> None:
    # Dovecot appends checkpassword-reply as PROG: authtest execs it with USER set on accept.
    with CheckpasswordDovecot(f"{AUTHTEST} --config {config} --checkpassword") as server:
        assert imap_login(server, "alice", PASSWORD) == "OK"
        assert "AUTHENTICATIONFAILED" in imap_login(server, "alice", "wrong-password")
        assert "AUTHENTICATIONFAILED" in imap_login(server, "mallory", PASSWORD)
        users = tmp_path / "users"
        write(users, f"alice:{PASSWORD}\nmallory:{PASSWORD}\n")  # the admin adds a user
        assert imap_login(server, "mallory", PASSWORD) == "OK"
        logs = server.logs()
    assert "Login: user=<alice>" in logs and "Login: user=<mallory>" in logs
    assert "password mismatch for alice" in logs  # authtest's one stderr line, logged
    assert PASSWORD not in logs


@pytest.mark.slow
def test_dovecot_hears_tempfail(tempfail_config) -> None:
    with CheckpasswordDovecot(f"{AUTHTEST} --config {tempfail_config} --checkpassword") as server:
        assert "UNAVAILABLE" in imap_login(server, "alice", PASSWORD)


# ---- ofmipd --check-config ---------------------------------------------------------------


def run_ofmipd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(ofmipd_command(*args), capture_output=True, timeout=60, env=server_env())


def test_check_config_prints_listeners_tls_rules_and_chain(tmp_path, config) -> None:
    cert = make_certificate(tmp_path)
    rules = write(tmp_path / "rules", "10.0.0.0/8 require-tls\n192.0.2.1 deny\n*  allow\n", 0o644)
    port = free_port()
    result = run_ofmipd(
        "--check-config", "--config", str(config), "-p", f"127.0.0.1:{port}", "-6",
        f"[::1]:{port}", "--tls", "on", "--ssl-cert", str(cert), "--ssl-key",
        str(tmp_path / "key.pem"), "--rules", str(rules), "-A", "/bin/false",
    )  # fmt: skip
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr
    assert f"listen: 127.0.0.1:{port}, [::1]:{port} (connections 100)" in out
    assert "tls: STARTTLS on" in out
    assert f"rules: 3 from {rules}" in out
    assert "authenticators (in order):\n  1. checkpassword /bin/false" in out
    assert "mechanisms: PLAIN LOGIN\n" in out
    result = run_ofmipd("--check-config", "--config", str(config))
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr
    assert "listen: 127.0.0.1:8025" in out and "tls: off" in out and "rules: 0" in out
    assert f"1. authfile {tmp_path / 'users'}" in out


@pytest.mark.parametrize(
    ("args", "word"),
    [
        (("-a", "/nonexistent/users"), "/nonexistent/users"),
        (("-a", "USERS", "--tls", "on"), "--ssl-cert"),
        (("-a", "USERS", "--rules", "RULES"), "line 1"),
        (("-a", "USERS", "-p", "127.0.0.1:99999"), "bad port"),
        (("--config", "/nonexistent.toml"), "/nonexistent.toml"),
    ],
)
def test_check_config_bad_config_exits_2_with_one_line(tmp_path, config, args, word) -> None:
    users = tmp_path / "users"
    rules = write(tmp_path / "rules", "10.0.0.0/8 maybe\n", 0o644)
    args = tuple(str(users) if a == "USERS" else str(rules) if a == "RULES" else a for a in args)
    result = run_ofmipd("--check-config", "--sendmail", CAPTURE, *args)
    err = result.stderr.decode()
    assert result.returncode == 2, (result.stdout, err)
    assert result.stdout == b""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("ofmipd: ") and word in err, err
