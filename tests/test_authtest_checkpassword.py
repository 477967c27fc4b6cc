"""ofmipd-authtest --checkpassword behind real consumers (ofmipd -A, Dovecot); --check-config."""

from __future__ import annotations

import grp
import imaplib
import os
import pwd
import re
import secrets
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from ofmipd import authtest
from tests.conftest import free_port
from tests.dovecot_server import Dovecot, make_certificate
from tests.ofmipd_server import CAPTURE, ROOT, Daemon, ofmipd_command, server_env

AUTHTEST = str(Path(sys.executable).parent / "ofmipd-authtest")
PASSWORD = "Zebra-Quokka-7731-distinct"
# ofmipd's authfile users have no passwd entry: these consumers want only the verdict.
VERDICT_ONLY = "--checkpassword-no-setuid --checkpassword"


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


def checkpassword(
    *args: str, data: bytes | None, env: dict[str, str] | None = None, cwd: Path | None = None
):
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
            cwd=cwd,
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
    args = (
        "--config",
        str(config),
        "--checkpassword-no-setuid",
        "--checkpassword",
        str(prog),
        "arg1",
    )
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


# ---- PROG runs as the user (DJB's process-state changes) --------------------------------

STATE_PROG = str(Path(__file__).parent / "checkpw_progs" / "process-state")


class ProcessState(NamedTuple):
    uid: int
    gid: int
    groups: set[int]
    cwd: str
    env: dict[str, str]


def process_state(stderr: bytes) -> ProcessState:
    """What checkpw_progs/process-state reported on stderr."""
    fields, env = {}, {}
    for line in stderr.decode().splitlines():
        if line.startswith("env:"):
            key, _, value = line[4:].partition("=")
            env[key] = value
        else:
            key, _, value = line.partition("=")
            fields[key] = value
    groups = {int(g) for g in fields["groups"].split()}
    return ProcessState(int(fields["uid"]), int(fields["gid"]), groups, fields["cwd"], env)


class SystemUser(NamedTuple):
    name: str
    entry: pwd.struct_passwd
    group: int  # a supplementary group it belongs to


@pytest.fixture
def make_user() -> Iterator[Callable[..., SystemUser]]:
    """Real system users (useradd, a home directory unless home=False) with a supplementary
    group each; deleted afterwards. `make_user` is a machine-wide fixture (conftest)."""
    made: list[tuple[str, str, str]] = []

    def make(home: bool = True) -> SystemUser:
        tag = secrets.token_hex(4)
        name, group = f"ofmcs_{tag}", f"ofmcsg_{tag}"
        top = tempfile.mkdtemp(prefix="ofmcs-", dir="/tmp")
        os.chmod(top, 0o755)  # the user must reach its home: pytest's tmp_path is 0700
        subprocess.run(["groupadd", group], check=True, capture_output=True)
        made.append((name, group, top))
        create = ["-m"] if home else ["-M"]
        subprocess.run(["useradd", *create, "-d", f"{top}/home", "-s", "/usr/sbin/nologin",
                        "-G", group, name], check=True, capture_output=True)  # fmt: skip
        return SystemUser(name, pwd.getpwnam(name), grp.getgrnam(group).gr_gid)

    yield make
    for name, group, top in made:
        subprocess.run(["userdel", "-f", name], capture_output=True)
        subprocess.run(["groupdel", group], capture_output=True)
        shutil.rmtree(top, ignore_errors=True)


# The caller's own: what a setuid must replace and --checkpassword-no-setuid must keep.
ROOTS_ENV = {**os.environ, "USER": "root", "HOME": "/root", "SHELL": "/bin/bash"}


def users_file(tmp_path: Path, name: str) -> Path:
    users = write(tmp_path / "users", f"{name}:{PASSWORD}\n")
    return write(tmp_path / "users.toml", f'[[auth]]\nkind = "authfile"\npath = "{users}"\n')


def test_checkpassword_runs_prog_as_the_canonical_user(tmp_path, make_user) -> None:
    user = make_user()
    config = users_file(tmp_path, user.name)
    # The client types the name in capitals; the authfile answers with the name it holds,
    # and that is the name looked up in the passwd database.
    good = f"{user.name.upper()}\0{PASSWORD}\0\0".encode()
    result = checkpassword("--config", str(config), "--checkpassword", STATE_PROG,
                           data=good, env=ROOTS_ENV, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    state = process_state(result.stderr)
    assert (state.uid, state.gid) == (user.entry.pw_uid, user.entry.pw_gid)
    assert state.groups == {user.entry.pw_gid, user.group}  # initgroups: not root's groups
    assert state.cwd == user.entry.pw_dir
    assert state.env["USER"] == user.name
    assert state.env["HOME"] == user.entry.pw_dir
    assert state.env["SHELL"] == "/usr/sbin/nologin"


def test_checkpassword_no_setuid_sets_only_user(tmp_path, make_user) -> None:
    user = make_user()
    config = users_file(tmp_path, user.name)
    good = f"{user.name.upper()}\0{PASSWORD}\0\0".encode()
    args = ("--config", str(config), "--checkpassword-no-setuid", "--checkpassword", STATE_PROG)
    result = checkpassword(*args, data=good, env=ROOTS_ENV, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    state = process_state(result.stderr)
    assert (state.uid, state.gid) == (0, 0)
    assert state.cwd == str(tmp_path.resolve())
    assert state.env["USER"] == user.name  # the canonical name, still
    assert (state.env["HOME"], state.env["SHELL"]) == ("/root", "/bin/bash")


def test_checkpassword_user_without_passwd_entry_exits_1(tmp_path, config) -> None:
    seen = tmp_path / "seen"
    prog = write(tmp_path / "prog", f"#!/bin/sh\ntouch {seen}\n", 0o755)
    good = f"alice\0{PASSWORD}\0\0".encode()  # an authfile user: no system account
    result = checkpassword("--config", str(config), "--checkpassword", str(prog), data=good)
    assert result.returncode == 1
    assert not seen.exists()
    (line,) = result.stderr.decode().splitlines()
    assert line.startswith("ofmipd-authtest: alice: accepted, but not in the passwd database")
    # Without PROG there is nobody to set up: the verdict alone, as before.
    assert checkpassword("--config", str(config), "--checkpassword", data=good).returncode == 0


def test_checkpassword_missing_home_is_a_temporary_failure(tmp_path, make_user) -> None:
    user = make_user(home=False)
    config = users_file(tmp_path, user.name)
    good = f"{user.name}\0{PASSWORD}\0\0".encode()
    result = checkpassword("--config", str(config), "--checkpassword", STATE_PROG, data=good)
    assert result.returncode == 111  # as DJB's checkpassword: the admin must fix it
    (line,) = result.stderr.decode().splitlines()
    assert f"cannot change to home directory {user.entry.pw_dir}: No such file" in line, line


def test_become_as_non_root_serves_only_its_own_user(monkeypatch, capsys, tmp_path) -> None:
    # An ofmipd-authtest run by a daemon that is not root (uid 4242, simulated: the venv's
    # interpreter is out of other users' reach here).
    me = pwd.struct_passwd(("me", "x", 4242, 4242, "", str(tmp_path), "/bin/sh"))
    real_getpwnam = pwd.getpwnam
    monkeypatch.setattr(pwd, "getpwnam", lambda name: me if name == "me" else real_getpwnam(name))
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    monkeypatch.setattr(os, "getuid", lambda: 4242)
    for call in ("initgroups", "setgid", "setuid"):
        monkeypatch.setattr(os, call, lambda *_: pytest.fail("only root changes ids"))
    assert authtest.become("root") == 111  # someone else: only root can switch
    assert "root: cannot switch to uid 0 as uid 4242: run as root" in capsys.readouterr().err
    monkeypatch.chdir("/")
    monkeypatch.setenv("HOME", "/root")
    monkeypatch.setenv("USER", "root")
    monkeypatch.setenv("SHELL", "/bin/bash")
    assert authtest.become("me") == 0  # itself: nothing to switch, the rest is set up
    assert (os.environ["USER"], os.environ["HOME"], os.environ["SHELL"]) == (
        "me",
        str(tmp_path),
        "/bin/sh",
    )
    assert os.getcwd() == str(tmp_path)


def test_checkpassword_no_setuid_alone_is_misuse(config) -> None:
    result = checkpassword("--config", str(config), "--checkpassword-no-setuid", "alice",
                           data=b"alice\0pw\0\0")  # fmt: skip
    assert result.returncode == 2
    assert b"--checkpassword-no-setuid goes with --checkpassword" in result.stderr
    # After --checkpassword it would be taken for PROG: said, rather than exec'd.
    args = ("--config", str(config), "--checkpassword", "--checkpassword-no-setuid", "/bin/true")
    result = checkpassword(*args, data=b"alice\0pw\0\0")
    assert result.returncode == 2
    assert b"give --checkpassword-no-setuid before --checkpassword" in result.stderr


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
    command = f"{AUTHTEST} --config {inner_config} {VERDICT_ONLY} /bin/true"
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
        # Dovecot clears the environment: without PYTHONPATH the console script would import
        # whichever checkout the venv was installed from, not this one.
        self.command = f"/usr/bin/env PYTHONPATH={ROOT} {command}"
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
    with CheckpasswordDovecot(f"{AUTHTEST} --config {config} {VERDICT_ONLY}") as server:
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
    with CheckpasswordDovecot(f"{AUTHTEST} --config {tempfail_config} {VERDICT_ONLY}") as server:
        assert "UNAVAILABLE" in imap_login(server, "alice", PASSWORD)


@pytest.mark.slow
def test_dovecot_refuses_a_setuid_checkpassword_and_takes_the_verdict_only_one(
    tmp_path, make_user
) -> None:
    # Dovecot's checkpassword-reply will not run as another uid than the auth process
    # (CVE-2013-6171: the user could ptrace it): Dovecot needs --checkpassword-no-setuid.
    user = make_user()
    config = users_file(tmp_path, user.name)
    with CheckpasswordDovecot(f"{AUTHTEST} --config {config} --checkpassword") as server:
        assert "UNAVAILABLE" in imap_login(server, user.name, PASSWORD)
        assert wait_for_log(server, "couldn't be run securely")
    with CheckpasswordDovecot(f"{AUTHTEST} --config {config} {VERDICT_ONLY}") as server:
        assert imap_login(server, user.name, PASSWORD) == "OK"
        assert wait_for_log(server, f"Login: user=<{user.name}>")


def wait_for_log(server: Dovecot, text: str, timeout: float = 10) -> bool:
    """Dovecot's processes write their lines through its log process: a moment later."""
    deadline = time.monotonic() + timeout
    while text not in server.logs():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


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
