"""ofmipd-passwd as the admin runs it: what it writes Dovecot's own `doveadm pw -t` accepts,
app passwords are printed once, writes are atomic and serialised."""

from __future__ import annotations

import argparse
import asyncio
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from auth_backends.passwd_file import PasswdFile
from ofmipd.auth import Secret, Verdict
from ofmipd.identity import ClientIdentity
from tests.conftest import free_port
from tests.ofmipd_server import CAPTURE, Daemon, server_env

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "Otter-Maple-5120-distinct"


def passwd(*args: str, stdin: str = PASSWORD + "\n") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "ofmipd.passwd", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    return result


def verify(path: Path, user: str, password: str, ip: str = "127.0.0.1") -> tuple[Verdict, str]:
    backend = PasswdFile(str(path), workers=1, timeout=10)
    outcome = asyncio.run(backend.verify(user, Secret(password.encode()), ClientIdentity(ip)))
    asyncio.run(backend.close())
    return outcome.verdict, outcome.reason


def passwd_daemon(path: Path, tmp_path: Path) -> Daemon:
    """A real ofmipd on this passwd-file, keeping last use in tmp_path/state."""
    capture = tmp_path / "capture"
    capture.mkdir()
    port = free_port()
    args = ["-p", f"127.0.0.1:{port}", "--hostname", "mx.test", "--passwd-file", str(path),
            "--sendmail", CAPTURE, "--state-dir", str(tmp_path / "state")]  # fmt: skip
    return Daemon(args, port, tmp_path, env=server_env(CAPTURE_DIR=str(capture)))


def last_use(path: Path, tmp_path: Path, label: str) -> str:
    """app-list's row for this label, through a configuration naming the state directory."""
    config = tmp_path / "ofmipd.toml"
    state = tmp_path / "state"
    config.write_text(f'state_dir = "{state}"\n[[auth]]\nkind = "passwd-file"\npath = "{path}"\n')
    config.chmod(0o600)
    listed = passwd("--config", str(config), "app-list", "alice")
    return [line for line in listed.stdout.splitlines() if line.startswith(label)][0]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "users"


@pytest.mark.slow
@pytest.mark.parametrize(
    "scheme",
    ["SCRAM-SHA-256", "SCRAM-SHA-1", "BLF-CRYPT", "ARGON2ID", "SHA512-CRYPT", "SSHA512", "PLAIN"],
)
def test_add_writes_hashes_that_doveadm_accepts(path: Path, scheme: str) -> None:
    result = passwd("--file", str(path), "add", "alice", "--scheme", scheme)
    assert result.returncode == 0, result.stderr
    line = path.read_text().strip()
    user, hashed = line.split(":", 1)
    assert user == "alice" and hashed.startswith(f"{{{scheme}}}")
    if scheme != "PLAIN":
        assert PASSWORD not in line
    test = subprocess.run(["doveadm", "pw", "-t", hashed, "-p", PASSWORD], capture_output=True)
    assert test.returncode == 0, test.stderr
    wrong = subprocess.run(["doveadm", "pw", "-t", hashed, "-p", "nope"], capture_output=True)
    assert wrong.returncode != 0
    assert verify(path, "alice", PASSWORD)[0] is Verdict.ACCEPT
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_add_again_replaces_only_the_main_password(path: Path) -> None:
    path.write_text("alice:{PLAIN}old-pw::::::allow_nets=127.0.0.0/8\nbob:{PLAIN}bob-pw\n")
    path.chmod(0o640)
    os.chown(path, 0, 65534)  # a group that may read it, as Dovecot's
    assert passwd("--file", str(path), "app-add", "alice", "phone").returncode == 0
    old = path.open()  # held open, so its inode cannot be reused by the next file
    inode = os.fstat(old.fileno()).st_ino
    assert passwd("--file", str(path), "add", "alice").returncode == 0
    assert old.read().startswith("alice:{PLAIN}old-pw:")  # a reader keeps the old file whole
    old.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and lines[0].endswith("::::::allow_nets=127.0.0.0/8")
    assert lines[1] == "bob:{PLAIN}bob-pw" and "label=phone" in lines[2]
    st = os.stat(path)
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o640, 0, 65534)
    assert st.st_ino != inode  # renamed into place, not rewritten
    assert verify(path, "alice", "old-pw")[0] is Verdict.REJECT
    assert verify(path, "alice", PASSWORD)[0] is Verdict.ACCEPT
    assert not list(path.parent.glob(".ofmipd-passwd.*"))  # no temporary file left


@pytest.mark.slow
def test_app_password_lifecycle(path: Path) -> None:
    assert passwd("--file", str(path), "add", "alice").returncode == 0
    made = passwd(
        "--file",
        str(path),
        "app-add",
        "alice",
        "phone",
        "--allow-nets",
        "192.0.2.0/24",
        "--expires",
        "2099-12-31",
        stdin="",
    )
    assert made.returncode == 0, made.stderr
    app_password = made.stdout.splitlines()[-1]
    assert len(app_password) == 24 and app_password.isalnum()
    assert made.stdout.count(app_password) == 1
    assert app_password not in path.read_text()  # only its hash is stored
    verdict, reason = verify(path, "alice", app_password, "192.0.2.9")
    assert verdict is Verdict.ACCEPT and "'phone'" in reason
    verdict, reason = verify(path, "alice", app_password, "198.51.100.1")
    assert verdict is Verdict.REJECT and "allow_nets=192.0.2.0/24" in reason

    listing = passwd("--file", str(path), "app-list", "alice")
    assert listing.returncode == 0
    assert "phone\t192.0.2.0/24\tany\t2099-12-31\t(give --config)" in listing.stdout
    assert app_password not in listing.stdout

    again = passwd("--file", str(path), "app-add", "alice", "phone")
    assert again.returncode == 2 and "already has an app password 'phone'" in again.stderr

    assert passwd("--file", str(path), "app-revoke", "alice", "phone").returncode == 0
    assert verify(path, "alice", app_password, "192.0.2.9")[0] is Verdict.REJECT
    assert verify(path, "alice", PASSWORD)[0] is Verdict.ACCEPT
    gone = passwd("--file", str(path), "app-revoke", "alice", "phone")
    assert gone.returncode == 1 and "no app password 'phone'" in gone.stderr


@pytest.mark.slow
def test_verify_exits_like_authtest(path: Path) -> None:
    assert passwd("--file", str(path), "add", "alice", "--scheme", "BLF-CRYPT").returncode == 0
    good = passwd("--file", str(path), "verify", "alice")
    assert good.returncode == 0 and good.stdout.startswith("accept")
    bad = passwd("--file", str(path), "verify", "alice", stdin="wrong-pw\n")
    assert bad.returncode == 1 and "mismatch" in bad.stdout
    path.chmod(0o644)
    refused = passwd("--file", str(path), "verify", "alice")
    assert refused.returncode == 2 and "must be 0600 or 0640" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_a_new_main_password_goes_before_the_app_passwords(path: Path) -> None:
    assert passwd("--file", str(path), "add", "bob", "--scheme", "PLAIN").returncode == 0
    assert passwd("--file", str(path), "app-add", "alice", "phone").returncode == 0
    assert passwd("--file", str(path), "add", "alice", "--scheme", "SSHA512").returncode == 0
    lines = path.read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["bob", "alice", "alice"]
    assert lines[1].startswith("alice:{SSHA512}") and "label=phone" in lines[2]


def test_a_change_the_server_would_refuse_is_not_written(path: Path) -> None:
    assert passwd("--file", str(path), "add", "alice").returncode == 0
    before = path.read_bytes()
    bad = passwd("--file", str(path), "app-add", "alice", "tab", "--expires", "soon")
    assert bad.returncode == 2 and "not written" in bad.stderr and "line 2" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert path.read_bytes() == before
    assert passwd("--file", str(path), "app-add", "alice", "a b").returncode == 2


@pytest.mark.slow
def test_concurrent_writers_lose_no_line(path: Path) -> None:
    assert passwd("--file", str(path), "add", "alice", "--scheme", "PLAIN").returncode == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ofmipd.passwd",
                "--file",
                str(path),
                "app-add",
                "alice",
                f"device{i}",
                "--scheme",
                "PLAIN",
            ],  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for i in range(8)
    ]
    for process in processes:
        assert process.wait(timeout=120) == 0, process.stderr.read() if process.stderr else ""
    labels = {line.split("label=")[1] for line in path.read_text().splitlines()[1:]}
    assert labels == {f"device{i}" for i in range(8)}


def test_file_comes_from_the_config(path: Path, tmp_path: Path) -> None:
    config = tmp_path / "ofmipd.toml"
    config.write_text(f'[[auth]]\nkind = "passwd-file"\npath = "{path}"\n')
    config.chmod(0o600)
    assert passwd("--config", str(config), "add", "alice").returncode == 0
    assert path.read_text().startswith("alice:{SCRAM-SHA-256}")
    config.write_text('[[auth]]\nkind = "authfile"\npath = "/x"\n')
    missing = passwd("--config", str(config), "add", "alice")
    assert missing.returncode == 2 and "no [[auth]]" in missing.stderr


def test_help_names_every_command() -> None:
    out = passwd("--help", stdin="").stdout
    for command in ("add", "app-add", "app-list", "app-revoke", "verify", "--file", "--config"):
        assert command in out


def test_last_use_is_kept_in_the_state_directory_and_listed(path: Path, tmp_path: Path) -> None:
    from ofmipd.ratelimit import open_store

    assert passwd("--file", str(path), "add", "alice", "--scheme", "PLAIN").returncode == 0
    made = passwd("--file", str(path), "app-add", "alice", "phone", stdin="")
    app_password = made.stdout.splitlines()[-1]
    before = path.read_bytes()
    state = tmp_path / "state"
    config = tmp_path / "ofmipd.toml"
    config.write_text(f'state_dir = "{state}"\n[[auth]]\nkind = "passwd-file"\npath = "{path}"\n')
    config.chmod(0o600)
    never = passwd("--config", str(config), "app-list", "alice")
    assert never.returncode == 0 and "phone\tany\tany\tnever\tnever" in never.stdout, never

    async def login() -> None:
        backend = PasswdFile(str(path), workers=1, timeout=10)
        backend.store = open_store("sqlite", {}, state_dir=str(state))
        client = ClientIdentity("192.0.2.44")
        assert (await backend.verify("alice", Secret(PASSWORD.encode()), client)).verdict is (
            Verdict.ACCEPT
        )  # the main password: no label, nothing recorded
        outcome = await backend.verify("alice", Secret(app_password.encode()), client)
        assert outcome.verdict is Verdict.ACCEPT
        await backend.store.close()
        await backend.close()

    asyncio.run(login())
    assert path.read_bytes() == before  # never in the user file
    listed = passwd("--config", str(config), "app-list", "alice")
    row = [line for line in listed.stdout.splitlines() if line.startswith("phone")][0]
    assert row.endswith("Z from 192.0.2.44"), listed.stdout


@pytest.mark.slow
def test_a_real_login_names_the_label_and_records_last_use(path: Path, tmp_path: Path) -> None:
    import smtplib

    assert passwd("--file", str(path), "add", "alice").returncode == 0
    app_password = passwd("--file", str(path), "app-add", "alice", "tablet").stdout.split()[-1]
    with passwd_daemon(path, tmp_path) as daemon:
        port = daemon.port
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.login("alice", app_password)
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            with pytest.raises(smtplib.SMTPAuthenticationError):
                smtp.login("alice", app_password + "x")
        daemon.wait_for_log("app password 'tablet' matches")
        log = daemon.log_text()
    assert app_password not in log and PASSWORD not in log
    assert last_use(path, tmp_path, "tablet").endswith("Z from 127.0.0.1")


def test_add_prompts_twice_without_echo_on_a_terminal(path: Path) -> None:
    from tests.test_authtest import read_until

    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin, stdout and stderr are the pty, as in a terminal
        os.environ["PYTHONPATH"] = str(ROOT)
        args = [sys.executable, "-m", "ofmipd.passwd", "--file", str(path), "add", "alice"]
        os.execv(sys.executable, args)
    seen = b""
    try:
        seen = read_until(fd, b"New password:", seen)
        os.write(fd, PASSWORD.encode() + b"\r")
        seen = read_until(fd, b"Again:", seen)
        os.write(fd, PASSWORD.encode() + b"\r")
        seen = read_until(fd, None, seen)  # to EOF
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    text = seen.decode(errors="replace")
    assert PASSWORD not in text, text  # not echoed
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert verify(path, "alice", PASSWORD)[0] is Verdict.ACCEPT


def test_a_users_scram_lines_share_one_salt_so_each_logs_in_with_scram(path: Path) -> None:
    from auth_backends.passwd_file import SCRAM
    from ofmipd.auth import Chain
    from ofmipd.authtest import scram_exchange

    assert passwd("--file", str(path), "app-add", "alice", "phone").returncode == 0
    assert passwd("--file", str(path), "add", "alice").returncode == 0  # main after an app
    tablet = passwd("--file", str(path), "app-add", "alice", "tablet").stdout.split()[-1]
    phone_line = passwd("--file", str(path), "app-add", "bob", "phone")
    assert phone_line.returncode == 0
    assert passwd("--file", str(path), "add", "alice").returncode == 0  # replaced: same salt
    salts = {}
    for line in path.read_text().splitlines():
        user, hashed = line.split(":")[:2]
        salts.setdefault(user, set()).add(SCRAM["SCRAM-SHA-256"].parse(hashed[15:]).salt)
    assert len(salts["alice"]) == 1 and len(salts["bob"]) == 1
    assert salts["alice"] != salts["bob"]  # still random, and each user's own

    backend = PasswdFile(str(path), workers=1, timeout=10)
    chain, client = Chain([backend]), ClientIdentity("192.0.2.8")
    for password, reason in ((PASSWORD, "proof matches"), (tablet, "(app password 'tablet')")):
        decision = asyncio.run(
            scram_exchange(chain, "SCRAM-SHA-256", b"alice", password.encode(), client)
        )
        assert decision.verdict is Verdict.ACCEPT and decision.reason.endswith(reason), decision
    asyncio.run(backend.close())


def test_help_names_every_command_with_its_options_and_an_example() -> None:
    from ofmipd.passwd import build_parser

    result = passwd("--help")
    assert result.returncode == 0
    text = result.stdout
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == {"add", "app-add", "app-list", "app-revoke", "verify"}
    for name, sub in commands.choices.items():
        assert f"\n  {name} " in text, name  # its synopsis in the commands section
        examples = text.split("examples:", 1)[1]
        assert f" {name} " in examples, f"no example of {name}"
        for action in sub._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert option in text, f"{name} {option} missing from --help"
            assert action.help, f"{name} {action.dest} has no help of its own"
    for scheme in ("SCRAM-SHA-256", "SCRAM-SHA-1", "BLF-CRYPT", "ARGON2ID", "SSHA512"):
        assert scheme in text


@pytest.mark.slow
def test_a_real_scram_login_records_last_use_too(path: Path, tmp_path: Path) -> None:
    import base64
    import smtplib

    from scramp import ScramClient

    assert passwd("--file", str(path), "add", "alice").returncode == 0
    app_password = passwd("--file", str(path), "app-add", "alice", "mutt").stdout.split()[-1]
    with passwd_daemon(path, tmp_path) as daemon:
        port = daemon.port
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.ehlo()
            client = ScramClient(["SCRAM-SHA-256"], "alice", app_password)
            first = base64.b64encode(client.get_client_first().encode()).decode()
            _, text = smtp.docmd("AUTH", f"SCRAM-SHA-256 {first}")
            client.set_server_first(base64.b64decode(text).decode())
            _, text = smtp.docmd(base64.b64encode(client.get_client_final().encode()).decode())
            client.set_server_final(base64.b64decode(text).decode())
            assert smtp.docmd("")[0] == 235
        daemon.wait_for_log("SCRAM-SHA-256 proof matches (app password 'mutt')")
    assert last_use(path, tmp_path, "mutt").endswith("Z from 127.0.0.1")


def test_a_symlinked_file_is_written_where_it_really_is(tmp_path: Path) -> None:
    real = tmp_path / "dovecot" / "users"
    real.parent.mkdir()
    link = tmp_path / "users"
    link.symlink_to(real)
    assert passwd("--file", str(link), "add", "alice").returncode == 0
    assert passwd("--file", str(link), "app-add", "alice", "phone").returncode == 0
    assert link.is_symlink() and link.resolve() == real
    assert [line.split(":")[0] for line in real.read_text().splitlines()] == ["alice", "alice"]
    assert not list(tmp_path.glob(".ofmipd-passwd.*"))  # no temporary file beside the link


def test_a_planted_lock_symlink_is_not_followed(path: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    Path(str(path) + ".lock").symlink_to(target)
    done = passwd("--file", str(path), "add", "alice")
    assert done.returncode != 0 and not target.exists()
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
