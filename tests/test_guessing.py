"""Guessing resistance end to end, on by default: real daemons and `ofmipd -1` processes
sharing the SQLite store, real checkpassword programs, slapd and fail2ban-regex."""

from __future__ import annotations

import base64
import os
import pwd
import socket
import subprocess
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_fail2ban import f2b_conf, fail2ban_regex  # noqa: F401 (f2b_conf is a fixture)

from tests import ldap_server
from tests.conftest import free_port
from tests.ofmipd_server import CAPTURE, Daemon, authfile, ofmipd_command, server_env
from tests.ofmipd_server import start_daemon as start_any_daemon

slapd = ldap_server.slapd
COUNTED = str(Path(__file__).parent / "checkpw_progs" / "counted")
PASSWORD = "Right-Pw-12"


@pytest.fixture
def users(tmp_path: Path) -> Path:
    return authfile(tmp_path, f"alice:{PASSWORD}\nbob:bob-Pw-34\n")


def plain(user: str, password: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{password}".encode())


class Session:
    """A line-level SMTP client: from a chosen loopback address, or behind a PROXY header."""

    def __init__(self, port: int, source: str = "127.0.0.1", proxy: str | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), 60, (source, 0))
        if proxy is not None:  # PROXY v1, as a trusted balancer would send it
            family = "TCP6" if ":" in proxy else "TCP4"
            server = "2001:db8::25" if ":" in proxy else "192.0.2.25"
            self.sock.sendall(f"PROXY {family} {proxy} {server} 40000 587\r\n".encode())
        self.replies = self.sock.makefile("rb")
        assert self.reply().startswith(b"220")
        assert self.command(b"EHLO client.test").startswith(b"250 ")

    def reply(self) -> bytes:
        while True:
            line = self.replies.readline()
            if line[3:4] != b"-":
                return line

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def close(self) -> None:
        try:
            self.sock.sendall(b"QUIT\r\n")
        except OSError:
            pass
        self.replies.close()
        self.sock.close()


def login(port: int, user: str, password: str, **where: str) -> str:
    """One session, one AUTH PLAIN: the reply code."""
    session = Session(port, **where)
    try:
        return session.command(b"AUTH PLAIN " + plain(user, password))[:3].decode()
    finally:
        session.close()


def start_daemon(tmp_path: Path, users: Path, capture: Path, *args: str) -> Daemon:
    """A daemon with default guessing limits. These tests make dozens of connections from
    127.0.0.1, which the default --max-per-ip (tests/test_connection_limits.py) would
    refuse while earlier sessions are still closing: allow more simultaneous ones."""
    return start_any_daemon(tmp_path, users, capture, "--max-per-ip", "50", *args)


def in_parallel(count: int, attempt: Callable[[int], str], threads: int = 8) -> list[str]:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(attempt, range(count)))


def one_session(users: Path, env: dict[str, str], user: str, password: str, *args: str) -> str:
    """`ofmipd -1` on a socketpair, as stunnel's exec runs it: the AUTH reply code."""
    ours, theirs = socket.socketpair()
    with ours:
        proc = subprocess.Popen(
            ofmipd_command("-1", "-a", str(users), "--sendmail", CAPTURE, *args),
            stdin=theirs,
            stdout=theirs,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        theirs.close()
        ours.settimeout(60)
        replies = ours.makefile("rb")

        def reply() -> bytes:
            line = replies.readline()
            while line[3:4] == b"-":
                line = replies.readline()
            return line

        assert reply().startswith(b"220")
        ours.sendall(b"EHLO client.test\r\n")
        assert reply().startswith(b"250 ")
        ours.sendall(b"AUTH PLAIN " + plain(user, password) + b"\r\n")
        code = reply()[:3].decode()
        ours.sendall(b"QUIT\r\n")
        reply()
        replies.close()
        proc.wait(60)
    return code


def counts(codes: Iterable[str]) -> dict[str, int]:
    result: dict[str, int] = {}
    for code in codes:
        result[code] = result.get(code, 0) + 1
    return result


# ---- on by default, in every launch mode -------------------------------------------------


@pytest.mark.slow
def test_forty_wrong_logins_then_the_right_password_are_refused_by_a_default_daemon(
    tmp_path: Path, users: Path, capture: Path
) -> None:
    with start_daemon(tmp_path, users, capture) as daemon:  # no rate-limit flag at all
        codes = in_parallel(40, lambda _: login(daemon.port, "alice", "guess"))
        right = login(daemon.port, "alice", PASSWORD)
        log = daemon.log_text()
    assert counts(codes) == {"535": 5, "454": 35}  # 5 guesses reached the backend
    assert right == "454"
    assert log.count("auth reject:") == 5
    assert "auth refused: client=127.0.0.1 user=alice reason='too many failures from" in log


@pytest.mark.slow
def test_forty_one_session_processes_sharing_the_state_dir_refuse_the_guesser(
    tmp_path: Path, users: Path
) -> None:
    env = server_env(TCPREMOTEIP="192.0.2.50", STATE_DIRECTORY=str(tmp_path / "state"))
    codes = in_parallel(40, lambda _: one_session(users, env, "alice", "guess"))
    right = one_session(users, env, "alice", PASSWORD)
    assert counts(codes) == {"535": 5, "454": 35}
    assert right == "454"
    assert (tmp_path / "state" / "ofmipd.db").is_file()
    # another address is not affected, and not by alice's lock either once it is known
    other = dict(env, TCPREMOTEIP="192.0.2.51")
    assert one_session(users, other, "bob", "bob-Pw-34") == "235"


@pytest.mark.slow
def test_fifteen_concurrent_auths_reach_a_slow_backend_at_most_max_failures_times(
    tmp_path: Path, users: Path, capture: Path
) -> None:
    runs = tmp_path / "runs"
    with start_daemon(tmp_path, users, capture, "-A", f"{COUNTED} {runs} 0.5") as daemon:
        ready = threading.Barrier(15)

        def attempt(_: int) -> str:
            session = Session(daemon.port)
            try:
                ready.wait(30)  # all fifteen connected; now the AUTHs go at once
                return session.command(b"AUTH PLAIN " + plain("alice", "guess"))[:3].decode()
            finally:
                session.close()

        codes = in_parallel(15, attempt, threads=15)
    backend_runs = len(runs.read_text().splitlines())
    print(f"backend runs out of 15 simultaneous AUTHs (daemon): {backend_runs}")
    assert backend_runs <= 5
    assert counts(codes) == {"535": backend_runs, "454": 15 - backend_runs}


@pytest.mark.slow
def test_fifteen_concurrent_one_session_processes_reach_the_backend_at_most_five_times(
    tmp_path: Path, users: Path
) -> None:
    runs = tmp_path / "runs"
    env = server_env(TCPREMOTEIP="192.0.2.60", STATE_DIRECTORY=str(tmp_path / "state"))
    codes = in_parallel(
        15,
        lambda _: one_session(users, env, "alice", "guess", "-A", f"{COUNTED} {runs} 0.5"),
        threads=15,
    )
    backend_runs = len(runs.read_text().splitlines())
    print(f"backend runs out of 15 simultaneous AUTHs (-1 processes): {backend_runs}")
    assert backend_runs <= 5
    assert counts(codes) == {"535": backend_runs, "454": 15 - backend_runs}


@pytest.mark.slow
def test_addresses_rotated_inside_one_ipv6_64_count_as_one(
    tmp_path: Path, users: Path, capture: Path
) -> None:
    with start_daemon(tmp_path, users, capture, "--proxy-protocol", "127.0.0.1") as daemon:
        codes = [
            login(daemon.port, "alice", "guess", proxy=f"2001:db8:1:2::{n:x}") for n in range(1, 7)
        ]
        same_64 = login(daemon.port, "bob", "bob-Pw-34", proxy="2001:db8:1:2:ffff:1:2:3")
        next_64 = login(daemon.port, "bob", "bob-Pw-34", proxy="2001:db8:1:3::1")
        log = daemon.log_text()
    assert codes == ["535"] * 5 + ["454"]
    assert (same_64, next_64) == ("454", "235")
    assert "too many failures from 2001:db8:1:2:ffff:1:2:3" in log


@pytest.mark.slow
def test_a_known_address_logs_in_while_an_attacker_has_locked_the_user(
    tmp_path: Path, users: Path, capture: Path
) -> None:
    with start_daemon(tmp_path, users, capture) as daemon:
        assert login(daemon.port, "alice", PASSWORD, source="127.0.0.2") == "235"  # her desk
        guesses = [login(daemon.port, "alice", "guess", source="127.0.0.3") for _ in range(5)]
        stranger = login(daemon.port, "alice", PASSWORD, source="127.0.0.4")
        desk = login(daemon.port, "ALICE", PASSWORD, source="127.0.0.2")
        attacker = login(daemon.port, "alice", PASSWORD, source="127.0.0.3")
    assert guesses == ["535"] * 5
    assert stranger == "454"  # alice is locked for addresses she never used
    assert desk == "235"  # but not where she logged in before
    assert attacker == "454"  # and the attacker's own address stays locked


def test_flooding_the_memory_store_with_new_addresses_keeps_the_lockout(
    tmp_path: Path, users: Path, capture: Path
) -> None:
    config = tmp_path / "ofmipd.toml"
    config.write_text('[ratelimit]\nstore = "memory"\nmax_entries = 50\nfailure_delay = 0\n')
    args = ("--config", str(config), "--proxy-protocol", "127.0.0.1")
    with start_daemon(tmp_path, users, capture, *args) as daemon:
        locked = [login(daemon.port, "alice", "guess", proxy="192.0.2.1") for _ in range(6)]
        flood = in_parallel(
            300, lambda n: login(daemon.port, f"u{n}", "x", proxy=f"10.0.{n // 250}.{n % 250}")
        )
        after = login(daemon.port, "bob", "bob-Pw-34", proxy="192.0.2.1")
    assert locked == ["535"] * 5 + ["454"]
    assert set(flood) == {"535"}
    assert after == "454"


@pytest.mark.slow
def test_an_unusable_state_dir_is_said_once_and_fails_open_to_memory_or_closed(
    tmp_path: Path, users: Path, capture: Path
) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "state").symlink_to(tmp_path / "elsewhere")
    state = ("--state-dir", str(tmp_path / "state"))
    with start_daemon(tmp_path, users, capture, *state) as daemon:
        opened = [login(daemon.port, "alice", "guess") for _ in range(6)]
        open_log = daemon.log_text()
    with start_daemon(tmp_path, users, capture, *state, "--ratelimit-fail-closed") as daemon:
        closed = [login(daemon.port, "alice", PASSWORD) for _ in range(3)]
        closed_log = daemon.log_text()
    assert opened == ["535"] * 5 + ["454"]  # limited all the same, in memory
    (line,) = [x for x in open_log.splitlines() if "ratelimit: sqlite store unavailable" in x]
    assert "is a symlink" in line
    assert "failing open: logins are limited in this process's memory only" in line
    assert closed == ["454"] * 3
    (line,) = [x for x in closed_log.splitlines() if "ratelimit: sqlite store unavailable" in x]
    assert "failing closed: AUTH is refused" in line
    assert not list((tmp_path / "elsewhere").iterdir())


# ---- a temporary failure elsewhere does not switch the defences off (section 9) ------------


@pytest.mark.slow
def test_guesses_next_to_a_dead_remote_backend_are_limited_and_seen_by_fail2ban(
    tmp_path: Path,
    users: Path,
    capture: Path,
    f2b_conf: Path,  # noqa: F811
) -> None:
    dead = f"imap://127.0.0.1:{free_port()}"  # nobody listens: every IMAP check is TEMPFAIL
    with start_daemon(tmp_path, users, capture, "-R", dead) as daemon:
        codes = in_parallel(40, lambda _: login(daemon.port, "alice", "guess"))
        right = login(daemon.port, "alice", PASSWORD)
        log = daemon.log_text()
    rejects = log.count("auth reject:")
    print(f"guesses before lockout next to a dead backend: {rejects}")
    assert set(codes) == {"454"}  # the backend that is down might have said yes
    assert rejects == 20  # counted at a quarter: 4 x max_failures
    assert "failed temporarily" in log and "answered 454" in log
    assert right == "454"  # the guesser is locked out, even with the right password
    log_file = tmp_path / "ofmipd.log"
    log_file.write_text(log)
    banned = fail2ban_regex(log_file, f2b_conf)
    assert set(banned) == {"127.0.0.1"} and len(banned) >= 20


# ---- one counter per user, whatever the spelling --------------------------------------------


@pytest.mark.slow
def test_spellings_of_alice_share_her_counter_against_slapd(
    tmp_path: Path, capture: Path, slapd: ldap_server.Slapd
) -> None:
    port = free_port()
    template = f"uid=%s,{ldap_server.PEOPLE}"
    args = ["-p", f"127.0.0.1:{port}", "-R", f"{slapd.uri}/{template}", "--sendmail", CAPTURE]
    with Daemon(args, port, tmp_path, env=server_env(CAPTURE_DIR=str(capture))) as daemon:
        spellings = ["ALICE", "ａｌｉｃｅ", "ALİCE", "Alice", "ａＬｉＣｅ"]
        codes = [
            login(daemon.port, name, "guess", source=f"127.0.0.{20 + n}")
            for n, name in enumerate(spellings)
        ]
        alice = login(daemon.port, "alice", "alice-pw", source="127.0.0.30")
        bob = login(daemon.port, "bob", "bob-pw", source="127.0.0.30")
    assert codes == ["535"] * 5  # five different addresses: no address lock
    assert alice == "454"  # but one user: alice is locked
    assert bob == "235"


# ---- what the admin sees, and who owns the files ------------------------------------------


def check_config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ofmipd_command("--check-config", "--sendmail", CAPTURE, *args),
        capture_output=True,
        text=True,
        timeout=120,
        env=env or server_env(),
    )


def test_check_config_prints_the_guessing_limit_mode_and_store(tmp_path: Path, users: Path) -> None:
    auth = ("-a", str(users))
    env = server_env(STATE_DIRECTORY=f"{tmp_path / 'systemd'}:{tmp_path / 'other'}")
    default = check_config(*auth, env=env)
    assert default.returncode == 0, default.stderr
    (line,) = [x for x in default.stdout.splitlines() if x.startswith("login rate limit:")]
    assert line.startswith(f"login rate limit: sqlite {tmp_path / 'systemd'}/ofmipd.db: 5 failures")
    assert "in 600s" in line and "lock for 60s doubling to 3600s" in line
    assert line.endswith("fail open (to a limit in process memory)")
    assert (tmp_path / "systemd").is_dir() and not (tmp_path / "other").exists()
    flag = check_config(*auth, "--state-dir", str(tmp_path / "flag"), "--ratelimit-fail-closed")
    assert f"sqlite {tmp_path / 'flag'}/ofmipd.db: 5 failures" in flag.stdout
    assert "3600s, 1s delay per failure, fail closed\n" in flag.stdout
    off = check_config(*auth, "--ratelimit", "off")
    assert "login rate limit: off (--ratelimit off)" in off.stdout
    redis = check_config(*auth, "--ratelimit", "redis://:s3cret@127.0.0.1:6390/0")
    assert "login rate limit: redis redis://:***@127.0.0.1:6390/0: 5 failures" in redis.stdout
    assert "s3cret" not in redis.stdout + redis.stderr
    (tmp_path / "link").symlink_to(tmp_path)
    broken = check_config(*auth, "--state-dir", str(tmp_path / "link"))
    assert broken.returncode == 0
    assert f"(unusable: {tmp_path / 'link'} is a symlink)" in broken.stdout
    for bad, words in (
        (("-1", "--ratelimit", "memory"), "one-session process forgets"),
        (("--workers", "2", "--ratelimit", "memory"), "each worker would count apart"),
    ):
        refused = check_config(*auth, *bad)
        assert refused.returncode == 2 and words in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1


def test_toml_names_the_state_dir_or_turns_the_limits_off(tmp_path: Path, users: Path) -> None:
    config = tmp_path / "ofmipd.toml"
    config.write_text(f'state_dir = "{tmp_path / "toml-state"}"\n')
    named = check_config("--config", str(config), "-a", str(users))
    assert f"login rate limit: sqlite {tmp_path / 'toml-state'}/ofmipd.db: 5" in named.stdout
    config.write_text('ratelimit = "off"\n')
    off = check_config("--config", str(config), "-a", str(users))
    assert "login rate limit: off (--ratelimit off)" in off.stdout
    # a hostile $STATE_DIRECTORY cannot add lines to what the admin reads
    forged = tmp_path / "x\nlogin rate limit: off (--ratelimit off)"
    hostile = check_config("-a", str(users), env=server_env(STATE_DIRECTORY=str(forged)))
    (line,) = [x for x in hostile.stdout.splitlines() if x.startswith("login rate limit:")]
    assert "x\\x0alogin rate limit/ofmipd.db: 5" in line and line.endswith(
        "fail open (to a limit in process memory)"
    )


@pytest.fixture
def world_traversable(tmp_path: Path) -> Path:
    """A directory the run user (nobody) can reach: pytest's tmp dirs are 0700 root."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="ofmipd-owner-"))
    path.chmod(0o755)
    yield path  # type: ignore[misc]
    shutil.rmtree(path, ignore_errors=True)


def owners(directory: Path) -> dict[str, tuple[str, int]]:
    found = {directory.name: directory}
    found.update({p.name: p for p in directory.iterdir()})
    return {
        name: (pwd.getpwuid(p.lstat().st_uid).pw_name, p.lstat().st_mode & 0o777)
        for name, p in found.items()
    }


@pytest.mark.slow
def test_state_files_belong_to_the_run_user(
    tmp_path: Path, users: Path, capture: Path, world_traversable: Path
) -> None:
    readable = world_traversable / "users"  # the authfile is read again after the drop
    readable.write_bytes(users.read_bytes())
    readable.chmod(0o600)
    os.chown(readable, pwd.getpwnam("nobody").pw_uid, -1)
    state = world_traversable / "state"
    args = ("-u", "nobody", "--state-dir", str(state))
    with start_daemon(tmp_path, readable, capture, *args) as d:
        assert login(d.port, "alice", "guess") == "535"
        assert login(d.port, "bob", "bob-Pw-34") == "235"
        found = owners(state)
    assert found["state"] == ("nobody", 0o700)
    assert {name for name in found} >= {"ofmipd.db", "ofmipd.db-wal", "ofmipd.db-shm"}
    assert {owner for owner, _ in found.values()} == {"nobody"}
    # a one-session process started as root with -u: the same owner for every file
    one = world_traversable / "one"
    env = server_env(TCPREMOTEIP="192.0.2.70", STATE_DIRECTORY=str(one))
    assert one_session(readable, env, "alice", "guess", "-u", "nobody") == "535"
    assert {owner for owner, _ in owners(one).values()} == {"nobody"}
    assert owners(one)["one"] == ("nobody", 0o700)
