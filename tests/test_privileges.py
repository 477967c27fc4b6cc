"""-u for real: real system users and groups, a real privilege drop, files planted by them.

Users and groups are made with useradd/groupadd (names ofmpriv_*) and removed afterwards.
Everything a run user must reach lives in a directory outside pytest's root-only tmp_path.
"""

from __future__ import annotations

import base64
import grp
import os
import pwd
import secrets
import shutil
import signal
import smtplib
import socket
import ssl
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.conftest import free_port
from tests.ofmipd_server import ROOT, Daemon, ofmipd_command, server_env
from tests.tls_support import make_certificate

PASSWORD = "Privs-Secret-4"
MESSAGE = "Subject: privileges\r\n\r\nhello\r\n"


# Users, groups and the permissions of the Python installation are machine-wide.
pytestmark = pytest.mark.root


@pytest.fixture(scope="module", autouse=True)
def python_reachable_by_other_users() -> None:
    """A dropped server imports modules lazily (delivery, reload), as the run user. Where
    the interpreter lives under a directory only root may enter (pyenv in /root), grant
    search permission (o+x, not listing) on that directory, as a packaged Python has.
    Never reverted: other test runs may be relying on it at the same moment."""
    import aiosmtpd

    for start in (Path(os.__file__).parent, Path(aiosmtpd.__file__).parent, ROOT):
        for directory in [start, *start.parents]:
            mode = directory.stat().st_mode
            if not mode & stat.S_IXOTH:
                directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


class User(NamedTuple):
    name: str
    uid: int
    gid: int


def run(*command: str) -> None:
    for _ in range(50):  # useradd and friends fail while another run holds /etc/passwd
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode == 0:
            return
        if "lock" not in result.stderr:
            break
        time.sleep(0.2)
    raise RuntimeError(f"{' '.join(command)}: {result.stderr}")


@pytest.fixture
def make_user() -> Iterator[Callable[..., User]]:
    """Real users (with their own primary group) and extra groups, deleted afterwards."""
    users: list[str] = []
    groups: list[str] = []

    def make(*, extra_group: str | None = None) -> User:
        name = f"ofmpriv_{secrets.token_hex(4)}"
        extra = ["-G", extra_group] if extra_group else []
        run("useradd", "-M", "-U", "-s", "/usr/sbin/nologin", *extra, name)
        users.append(name)
        entry = pwd.getpwnam(name)
        return User(name, entry.pw_uid, entry.pw_gid)

    def make_group() -> str:
        name = f"ofmprivg_{secrets.token_hex(4)}"
        run("groupadd", name)
        groups.append(name)
        return name

    make.group = make_group  # type: ignore[attr-defined]
    yield make
    for name in users:
        subprocess.run(["userdel", "-f", name], capture_output=True)
    for name in groups:
        subprocess.run(["groupdel", name], capture_output=True)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory other users can enter (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="ofmipd-privs-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def proc_status(pid: int) -> dict[str, list[int]]:
    """Uid, Gid and Groups of a live process, from /proc (what the kernel enforces)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            fields[key] = [int(x) for x in value.split()]
    return fields


def write_authfile(path: Path, owner: User | None = None) -> Path:
    path.write_text(f"erin:{PASSWORD}\n")
    path.chmod(0o600)
    if owner:
        os.chown(path, owner.uid, owner.gid)
    return path


def converse(sock: socket.socket, replies, commands: list[bytes]) -> list[bytes]:  # type: ignore[no-untyped-def]
    """The last line of the reply to each command."""
    out = []
    for command in commands:
        sock.sendall(command)
        line = replies.readline()
        while line[3:4] == b"-":
            line = replies.readline()
        out.append(line.rstrip(b"\r\n"))
    return out


SESSION = [
    b"EHLO client.test\r\n",
    b"AUTH PLAIN " + base64.b64encode(f"\0erin\0{PASSWORD}".encode()) + b"\r\n",
    b"MAIL FROM:<erin@example.org>\r\n",
    b"RCPT TO:<frank@example.net>\r\n",
    b"DATA\r\n",
    MESSAGE.encode() + b".\r\n",
    b"QUIT\r\n",
]


def test_one_session_drops_to_the_u_user_and_its_groups_before_reading_the_client(
    make_user, shared
) -> None:
    group = make_user.group()
    user = make_user(extra_group=group)
    # Root-only and written just now: read as root at start-up, and not re-read as the
    # run user only because it is recent (that re-read would fail and give 454).
    users = write_authfile(shared / "users")
    out = shared / "out"
    out.mkdir()
    os.chown(out, user.uid, user.gid)
    injector = shared / "inject"
    injector.write_text(
        '#!/bin/sh\n{ id -u; id -G; echo "LOGIN=$LOGIN"; } > "$OUT/id"\ncat > "$OUT/msg"\n'
    )
    injector.chmod(0o755)
    command = ofmipd_command(
        "-1", "--hostname", "mx.test", "-u", user.name, "-a", str(users),
        "--sendmail", str(injector),
    )  # fmt: skip
    ours, theirs = socket.socketpair()
    with ours:
        proc = subprocess.Popen(
            command,
            stdin=theirs,
            stdout=theirs,
            stderr=subprocess.PIPE,
            env=server_env(OUT=str(out)),
        )
        theirs.close()
        ours.settimeout(30)
        reader = ours.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        status = proc_status(proc.pid)  # the banner is out; no client byte was read yet
        replies = converse(ours, reader, SESSION)
        _, stderr = proc.communicate(timeout=30)
    assert status["Uid"] == [user.uid] * 4
    assert status["Gid"] == [user.gid] * 4
    assert grp.getgrnam(group).gr_gid in status["Groups"]
    assert replies[1].startswith(b"235 "), stderr
    assert replies[5].startswith(b"250 "), stderr
    uid, groups, login = (out / "id").read_text().splitlines()
    assert int(uid) == user.uid  # the injector ran as the run user, not root
    assert str(grp.getgrnam(group).gr_gid) in groups.split()
    assert login == "LOGIN=erin"
    assert proc.returncode == 0 and b"Traceback" not in stderr


def run_one_session(command: list[str], **popen: object) -> tuple[int, bytes, bytes]:
    """Run `ofmipd -1`; return its exit status, what it sent the client, and stderr."""
    ours, theirs = socket.socketpair()
    with ours:
        proc = subprocess.Popen(
            command, stdin=theirs, stdout=theirs, stderr=subprocess.PIPE, env=server_env(), **popen
        )
        theirs.close()
        ours.settimeout(30)
        ours.shutdown(socket.SHUT_WR)  # a client that says nothing
        sent = b""
        while chunk := ours.recv(4096):
            sent += chunk
        _, stderr = proc.communicate(timeout=30)
    return proc.returncode, sent, stderr


def test_one_session_u_is_refused_like_the_daemon_refuses_it(make_user, shared) -> None:
    user = make_user()
    users = write_authfile(shared / "users", owner=user)
    args = ["-1", "-a", str(users), "--sendmail", "/bin/true"]
    # Not root, and asked to become someone else: the session must not run at all.
    code, sent, stderr = run_one_session(
        ofmipd_command(*args, "-u", "root"), user=user.uid, group=user.gid, extra_groups=[]
    )
    assert (code, sent) == (2, b"")
    assert stderr.decode() == "ofmipd: --username root: only root can change user\n"
    code, sent, stderr = run_one_session(ofmipd_command(*args, "-u", "ofmpriv_nosuchuser"))
    assert (code, sent) == (2, b"")
    assert stderr.decode() == "ofmipd: --username ofmpriv_nosuchuser: no such user\n"
    # Already that user: nothing to switch, the session runs.
    code, sent, _ = run_one_session(
        ofmipd_command(*args, "-u", user.name), user=user.uid, group=user.gid, extra_groups=[]
    )
    assert code == 0 and sent.startswith(b"220 ")


def peer_certificate(host: str, port: int) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, port), timeout=20) as raw:
        with context.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_daemon_keeps_supplementary_groups_so_sighup_reloads_a_group_readable_key(
    tmp_path, make_user, shared
) -> None:
    group = make_user.group()  # like ssl-cert: may read the key, which root owns
    user = make_user(extra_group=group)
    gid = grp.getgrnam(group).gr_gid
    first = make_certificate(tmp_path, "first.test")
    second = make_certificate(tmp_path, "second.test")
    keys = shared / "tls"
    keys.mkdir()
    os.chown(keys, 0, gid)
    keys.chmod(0o750)
    cert, key = keys / "cert.pem", keys / "key.pem"
    for path, source in ((cert, first[0]), (key, first[1])):
        path.write_bytes(source.read_bytes())
        os.chown(path, 0, gid)
        path.chmod(0o640)
    users = write_authfile(shared / "users", owner=user)  # read again on SIGHUP
    port = free_port()
    args = [
        "-p", f"127.0.0.1:{port}", "--hostname", "mx.test", "--ssl", "--ssl-cert", str(cert),
        "--ssl-key", str(key), "-a", str(users), "--sendmail", "/bin/true", "-u", user.name,
    ]  # fmt: skip
    with Daemon(args, port, tmp_path) as server:
        status = proc_status(server.proc.pid)
        assert status["Uid"] == [user.uid] * 4
        assert gid in status["Groups"]
        before = peer_certificate(server.host, port)
        assert before == ssl.PEM_cert_to_DER_cert(first[0].read_text())
        cert.write_bytes(second[0].read_bytes())  # same files, same owner and mode
        key.write_bytes(second[1].read_bytes())
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while peer_certificate(server.host, port) == before and time.monotonic() < deadline:
            time.sleep(0.1)
        after = peer_certificate(server.host, port)
        log = server.log_text()
    assert after == ssl.PEM_cert_to_DER_cert(second[0].read_text()), log
    assert "configuration reloaded" in log and "reload failed" not in log


def smtp_submit(host: str, port: int) -> tuple[int, bytes]:
    """(code, text) of the reply to the end of DATA."""
    with smtplib.SMTP(host, port, local_hostname="client.test", timeout=20) as client:
        client.login("erin", PASSWORD)
        client.mail("erin@example.org")
        client.rcpt("frank@example.net")
        return client.data(MESSAGE)


def test_maildir_is_made_for_the_run_user_who_then_delivers_into_it(
    tmp_path, make_user, shared
) -> None:
    user = make_user()
    users = write_authfile(shared / "users", owner=user)
    maildir = shared / "mail" / "Maildir"
    port = free_port()
    args = [
        "-p", f"127.0.0.1:{port}", "--hostname", "mx.test", "-a", str(users),
        "--maildir", str(maildir), "-u", user.name,
    ]  # fmt: skip
    with Daemon(args, port, tmp_path) as server:
        code, _ = smtp_submit(server.host, port)
        log = server.log_text()
    assert code == 250, log
    for directory in (maildir, maildir / "tmp", maildir / "new", maildir / "cur"):
        st = directory.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (user.uid, user.gid, 0o700)
    (message,) = (maildir / "new").iterdir()
    assert message.stat().st_uid == user.uid
    assert b"hello" in message.read_bytes()


def as_user(user: User, script: str, cwd: Path) -> None:
    subprocess.run(
        ["/bin/sh", "-ec", script],
        cwd=cwd,
        user=user.uid,
        group=user.gid,
        extra_groups=[],
        check=True,
        capture_output=True,
    )


# What another local user plants once the root-run server has made its Maildir in a
# directory they control, each time pointing at a directory of their own ("loot").
PLANTS = {
    "tmp and new": "mv Maildir/tmp Maildir/tmp.real; mv Maildir/new Maildir/new.real;"
    " ln -s ../loot Maildir/tmp; ln -s ../loot Maildir/new",
    "the Maildir itself": "mv Maildir Maildir.real; mkdir loot/tmp loot/new loot/cur;"
    " chmod 777 loot/tmp loot/new; ln -s loot Maildir",
}


@pytest.mark.parametrize("planted", sorted(PLANTS))
def test_root_maildir_delivery_refuses_symlinks_planted_by_another_user(
    tmp_path, make_user, shared, planted
) -> None:
    attacker = make_user()
    theirs = shared / "theirs"
    theirs.mkdir()
    os.chown(theirs, attacker.uid, attacker.gid)
    as_user(attacker, "mkdir Maildir loot; chmod 777 loot", theirs)
    users = write_authfile(tmp_path / "users")
    port = free_port()
    args = [
        "-p", f"127.0.0.1:{port}", "--hostname", "mx.test", "-a", str(users),
        "--maildir", str(theirs / "Maildir"), "-L",
    ]  # fmt: skip
    with Daemon(args, port, tmp_path) as server:  # as root, no -u
        as_user(attacker, PLANTS[planted], theirs)
        code, text = smtp_submit(server.host, port)
        server.stop()
        log = server.log_text()
    assert code == 451 and text.startswith(b"4.3.0"), log
    written = [p for p in (theirs / "loot").rglob("*") if p.is_file()]
    assert written == [], "a message was written through the link"
    assert "Traceback" not in log
    refusals = [line for line in log.splitlines() if "is a symbolic link, refused" in line]
    assert len(refusals) == 1, log
    assert "message not accepted" in refusals[0]


def test_maildir_that_is_a_symlink_at_start_up_is_one_line_and_exit_2(
    tmp_path, make_user, shared
) -> None:
    attacker = make_user()
    theirs = shared / "theirs"
    theirs.mkdir()
    os.chown(theirs, attacker.uid, attacker.gid)
    as_user(attacker, "mkdir loot; ln -s loot Maildir", theirs)
    users = write_authfile(tmp_path / "users")
    result = subprocess.run(
        ofmipd_command("-1", "-a", str(users), "--maildir", str(theirs / "Maildir")),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=server_env(),
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.decode() == (
        f"ofmipd: --maildir {theirs / 'Maildir'}: is a symbolic link, refused\n"
    )
    assert list((theirs / "loot").iterdir()) == []


def check_config(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ofmipd_command("--check-config", *args),
        capture_output=True,
        text=True,
        env=server_env(),
        timeout=60,
    )


def warnings(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("warning: ")]


def test_check_config_warns_about_what_the_run_user_cannot_do(tmp_path, make_user, shared) -> None:
    user = make_user()
    users = write_authfile(shared / "users")  # root's, mode 0600
    rules = shared / "rules"
    rules.write_text("127.0.0.1 allow\n")
    rules.chmod(0o600)
    senders = shared / "senders"
    senders.write_text("erin erin@example.org\n")
    senders.chmod(0o600)
    cert, key = make_certificate(shared)
    cert.chmod(0o644)
    key.chmod(0o600)
    toml = shared / "ofmipd.toml"
    toml.write_text("max_recipients = 10\n")
    toml.chmod(0o600)
    throttle = shared / "throttle"
    throttle.write_text("#!/bin/sh\nexit 0\n")
    throttle.chmod(0o700)
    maildir = shared / "Maildir"
    maildir.mkdir(mode=0o700)  # root's, so its tmp/ and new/ are out of the user's reach
    args = [
        "--config", str(toml), "-u", user.name, "-a", str(users), "--rules", str(rules),
        "--sender-map", str(senders), "--tls", "on", "--ssl-cert", str(cert), "--ssl-key",
        str(key), "-t", str(throttle), "-m", "other", "--maildir", str(maildir),
    ]  # fmt: skip
    result = check_config(*args)
    assert result.returncode == 0, result.stderr
    found = warnings(result.stdout)
    name = user.name
    for what, path, verb, when in (
        ("authfile", users, "read", "when it changes and on SIGHUP"),
        ("host rules", rules, "read", "on SIGHUP"),
        ("sender map", senders, "read", "on SIGHUP"),
        ("TLS key", key, "read", "on SIGHUP"),
        ("configuration", toml, "read", "on SIGHUP"),
        ("throttle script", throttle, "run", "for every message"),
        ("Maildir", maildir / "tmp", "write to", "for every message"),
        ("Maildir", maildir / "new", "write to", "for every message"),
    ):
        assert f"warning: {what} {path}: user {name} cannot {verb} it" in result.stdout, found
        assert any(line.endswith(when) for line in found if f" {path}: " in line)
    assert any(f"PAM as {name}: it cannot read /etc/shadow" in line for line in found)
    assert len(found) == 9, found
    assert f"run as: {name} (uid {user.uid}, groups {name}) after start-up" in result.stdout
    assert not any(str(cert) in line for line in found)  # 0644: readable

    # The same server in one-session mode reads its files before the drop, as root; it
    # still runs the throttle script and asks PAM as the run user.
    one = check_config("-1", *args[:-2], "--sendmail", "/bin/true")
    assert one.returncode == 0
    assert [line.split()[1] for line in warnings(one.stdout)] == ["throttle", "PAM"]

    # Files the run user owns, a Maildir it can write: nothing to say.
    for path in (users, rules, senders, key, toml, throttle):
        os.chown(path, user.uid, user.gid)
    maildir.chmod(0o755)
    clean = check_config(*[a for a in args if a not in ("-m", "other")])
    assert clean.returncode == 0 and warnings(clean.stdout) == [], clean.stdout


def test_check_config_with_an_unknown_run_user_is_one_line_and_exit_2(shared) -> None:
    users = write_authfile(shared / "users")
    result = check_config("-u", "ofmpriv_nosuchuser", "-a", str(users), "--sendmail", "/bin/true")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "ofmipd: --username ofmpriv_nosuchuser: no such user\n"


def test_check_config_names_checkpassword_programs_that_need_root(make_user, shared) -> None:
    user = make_user()
    users = write_authfile(shared / "users", owner=user)
    checkpw = shutil.which("checkpw")
    assert checkpw, "the checkpw package is installed by scripts/install-system-deps"
    result = check_config(
        "-u", user.name, "-a", str(users), "-A", f"{checkpw} /bin/true", "--sendmail", "/bin/true"
    )
    assert result.returncode == 0
    assert warnings(result.stdout) == [
        f"warning: checkpassword {checkpw} runs as {user.name}: it reads other users'"
        " passwords and switches to them, which needs root"
    ]


def test_a_symlink_at_a_message_name_is_never_written_through(tmp_path, monkeypatch) -> None:
    """A guard, already true before (O_EXCL in tmp/, rename replaces a link in new/):
    the name is fixed here so that a link can wait for it."""
    import asyncio

    from ofmipd.delivery import MaildirTarget, Submission

    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched\n")
    target = MaildirTarget(str(tmp_path / "Maildir"))
    monkeypatch.setattr(target, "_unique", lambda: "1.M1P1Q1R0.host")

    def deliver() -> str:
        submission = Submission("Q1", "a@b", ("c@d",), b"Subject: x\r\n\r\nbody\r\n", None, None)  # type: ignore[arg-type]
        return asyncio.run(target.deliver(submission))

    link = tmp_path / "Maildir" / "tmp" / "1.M1P1Q1R0.host"
    link.symlink_to(victim)
    assert deliver().startswith("451 4.3.0")
    link.unlink()
    landing = tmp_path / "Maildir" / "new" / "1.M1P1Q1R0.host"
    landing.symlink_to(victim)
    assert deliver().startswith("250 ")
    assert not landing.is_symlink() and landing.read_bytes().endswith(b"body\n")
    assert victim.read_bytes() == b"untouched\n"
