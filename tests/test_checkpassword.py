"""The checkpassword authenticator with real programs: Debian's checkpw and small stand-ins."""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import secrets
import shutil
import statistics
import subprocess
import tempfile
import time
import timeit
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from auth_backends import BackendSpec
from auth_backends import create as create_backend
from auth_backends.checkpassword import CheckPassword, create
from ofmipd.auth import Chain, Outcome, Secret, Verdict
from ofmipd.errors import ConfigError
from ofmipd.identity import ClientIdentity
from tests.loop_ticker import with_ticker
from tests.test_proc import wait_gone

PROGS = Path(__file__).resolve().parent / "checkpw_progs"
CHECKPW = "/usr/bin/checkpw"


def prog(name: str, *args: object) -> str:
    return " ".join([str(PROGS / name), *map(str, args)])


def backend(command: str | list[str] | None = None, **options: Any) -> CheckPassword:
    if options:
        if command is not None:
            options["command"] = command
        return create(BackendSpec("checkpassword", options=options))
    return create(BackendSpec("checkpassword", arg=command))


def verify(auth: CheckPassword, user: str, password: str, client: ClientIdentity) -> Outcome:
    return asyncio.run(auth.verify(user, Secret(password.encode()), client))


@pytest.fixture
def checkpw_user() -> Iterator[Callable[[str], str]]:
    """Real system users whose ~/Maildir/.password checkpw reads, deleted afterwards."""
    made: list[tuple[str, str]] = []

    def make(password: str) -> str:
        name = f"ofmcp_{secrets.token_hex(4)}"
        # checkpw changes to the user's uid and then into the home: every parent must
        # be searchable, which pytest's 0700 tmp_path is not.
        top = tempfile.mkdtemp(prefix="ofmcp-", dir="/tmp")
        os.chmod(top, 0o755)
        home = Path(top) / "home"
        subprocess.run(["useradd", "-M", "-d", str(home), "-s", "/usr/sbin/nologin", name],
                       check=True, capture_output=True)  # fmt: skip
        made.append((name, top))
        (home / "Maildir").mkdir(parents=True)
        secret = home / "Maildir" / ".password"
        secret.write_text(password + "\n")  # as checkpw's INSTALL says: echo PW > file
        entry = pwd.getpwnam(name)
        for path in (home, home / "Maildir", secret):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        secret.chmod(0o600)
        return name

    yield make
    for name, top in made:
        subprocess.run(["userdel", "-f", name], capture_output=True)
        shutil.rmtree(top, ignore_errors=True)


def test_debian_checkpw_accepts_the_right_password_and_rejects_others(
    checkpw_user: Callable[[str], str], client: ClientIdentity
) -> None:
    user = checkpw_user("s3cret pass \u00e9")
    auth = backend(f"{CHECKPW} /bin/true")
    assert auth.argv == [CHECKPW, "/bin/true"]
    right = verify(auth, user, "s3cret pass \u00e9", client)
    assert right.verdict is Verdict.ACCEPT, right
    wrong = verify(auth, user, "s3cret pass", client)
    assert (wrong.verdict, wrong.reason) == (Verdict.REJECT, "checkpassword exit 1")
    nobody = verify(auth, "ofmcp_nosuchuser", "s3cret pass \u00e9", client)
    assert nobody.verdict is Verdict.REJECT


def test_debian_checkpw_through_the_chain_and_a_lone_program(
    checkpw_user: Callable[[str], str], client: ClientIdentity
) -> None:
    user = checkpw_user("pw")
    auth = backend(CHECKPW)  # tmda-ofmipd appended /bin/true to a lone program
    assert auth.argv == [CHECKPW, "/bin/true"]
    chain = Chain([auth])
    good = asyncio.run(chain.authenticate(user.encode(), b"pw", client))
    bad = asyncio.run(chain.authenticate(user.encode(), b"pw2", client))
    assert (good.verdict, good.user) == (Verdict.ACCEPT, user)
    assert bad.verdict is Verdict.REJECT


@pytest.mark.parametrize(
    ("code", "verdict"),
    [(0, Verdict.ACCEPT), (1, Verdict.REJECT), (2, Verdict.TEMPFAIL), (3, Verdict.TEMPFAIL),
     (111, Verdict.TEMPFAIL), (127, Verdict.TEMPFAIL)],
)  # fmt: skip
def test_exit_codes_map_onto_the_three_verdicts(
    code: int, verdict: Verdict, client: ClientIdentity
) -> None:
    outcome = verify(backend(prog("exit-code", code)), "alice", "pw", client)
    assert (outcome.verdict, outcome.reason) == (verdict, f"checkpassword exit {code}")


def test_reject_codes_make_vchkpw_style_failures_rejections(client: ClientIdentity) -> None:
    auth = backend(prog("exit-code", 3), reject_codes=[1, 3])
    assert verify(auth, "alice", "pw", client).verdict is Verdict.REJECT
    auth = backend(prog("exit-code", 111), reject_codes=[1, 3])
    assert verify(auth, "alice", "pw", client).verdict is Verdict.TEMPFAIL


def test_a_crash_is_a_temporary_failure_named_by_its_signal(client: ClientIdentity) -> None:
    outcome = verify(backend(prog("crash")), "alice", "pw", client)
    assert (outcome.verdict, outcome.reason) == (
        Verdict.TEMPFAIL,
        "checkpassword killed by SIGSEGV",
    )


def test_a_hang_times_out_and_its_whole_process_group_dies(
    tmp_path: Path, client: ClientIdentity
) -> None:
    pidfile = tmp_path / "child"
    auth = backend(prog("hang", pidfile), timeout=1)
    started = time.monotonic()
    outcome = verify(auth, "alice", "pw", client)
    assert time.monotonic() - started < 5
    assert (outcome.verdict, outcome.reason) == (
        Verdict.TEMPFAIL,
        "checkpassword timed out after 1s",
    )
    assert wait_gone(int(pidfile.read_text())), "the sleep started by the program survived"


def test_default_timeout_is_ten_seconds() -> None:
    assert backend(prog("exit-code", 0)).timeout == 10.0


def test_a_program_reading_fd_3_slowly_still_works(client: ClientIdentity) -> None:
    auth = backend(prog("slow-reader", "alice", "pass-word"))
    assert verify(auth, "alice", "pass-word", client).verdict is Verdict.ACCEPT
    assert verify(auth, "alice", "pass-wort", client).verdict is Verdict.REJECT


def test_fd_3_holds_exactly_user_password_and_empty_timestamp(
    tmp_path: Path, client: ClientIdentity
) -> None:
    outcome = verify(backend(prog("record", tmp_path)), "al\u00efce@example.org", "p w", client)
    assert outcome.verdict is Verdict.ACCEPT
    assert (tmp_path / "fd3").read_bytes() == "al\u00efce@example.org\0p w\0\0".encode()
    assert (tmp_path / "stdin").read_text().strip() == "/dev/null"


def test_the_program_gets_the_client_launcher_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Our own launcher's variables describe some other client and must not leak through.
    monkeypatch.setenv("TCPREMOTEHOST", "stale.example")
    monkeypatch.setenv("TCPREMOTEINFO", "stale-ident")
    monkeypatch.setenv("OFM_OURS", "kept")
    client = ClientIdentity(ip="192.0.2.7", port=40123, local_ip="127.0.0.1", local_port=587)
    assert verify(backend(prog("record", tmp_path)), "u", "p", client).verdict is Verdict.ACCEPT
    env = dict(
        line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines() if "=" in line
    )
    assert env["TCPREMOTEIP"] == "192.0.2.7" and env["TCPREMOTEPORT"] == "40123"
    assert env["TCPLOCALIP"] == "127.0.0.1" and env["TCPLOCALPORT"] == "587"
    assert env["PROTO"] == "TCP" and env["OFM_OURS"] == "kept"
    assert "TCPREMOTEHOST" not in env and "TCPREMOTEINFO" not in env


def test_the_password_is_never_in_argv_environment_or_logs(
    tmp_path: Path, client: ClientIdentity, caplog: pytest.LogCaptureFixture
) -> None:
    password = f"Sec{secrets.token_hex(8)}"
    caplog.set_level(logging.DEBUG)
    assert verify(backend(prog("record", tmp_path)), "u", password, client).verdict is (
        Verdict.ACCEPT
    )
    for name in ("argv", "cmdline", "env"):
        assert password not in (tmp_path / name).read_text()
    # A program that repeats its input on stderr: logged, but with the password cut out.
    outcome = verify(backend(prog("tell", 111)), "u", password, client)
    assert outcome.verdict is Verdict.TEMPFAIL
    assert password not in outcome.reason
    logged = [r.getMessage() for r in caplog.records]
    assert any("<redacted>" in m for m in logged)
    assert any("second line" in m for m in logged)
    assert not any(password in m for m in logged)


def test_overlong_credentials_are_rejected_without_running_the_program(
    tmp_path: Path, client: ClientIdentity
) -> None:
    outcome = verify(backend(prog("record", tmp_path)), "u" * 300, "p" * 300, client)
    assert outcome.verdict is Verdict.REJECT and "512" in outcome.reason
    assert not (tmp_path / "fd3").exists()


def test_shell_command_lines_and_argv_lists(tmp_path: Path, client: ClientIdentity) -> None:
    shell = backend(f"OFM_X=1 {prog('exit-code', 1)} 2>/dev/null")
    assert shell.argv[:2] == ["/bin/sh", "-c"]
    assert verify(shell, "u", "p", client).verdict is Verdict.REJECT
    listed = backend([str(PROGS / "record"), f"{tmp_path}/x y"], timeout=5)
    (tmp_path / "x y").mkdir()
    assert verify(listed, "u", "p", client).verdict is Verdict.ACCEPT
    assert (tmp_path / "x y" / "fd3").read_bytes() == b"u\0p\0\0"
    assert listed.target == f"{PROGS / 'record'} '{tmp_path}/x y'"


def test_the_registry_builds_it_from_the_flag() -> None:
    auth = create_backend(BackendSpec("checkpassword", arg=f"{CHECKPW} /bin/true"))
    assert isinstance(auth, CheckPassword)
    assert (auth.name, auth.target) == ("checkpassword", f"{CHECKPW} /bin/true")


@pytest.mark.parametrize(
    ("arg", "options", "complaint"),
    [
        ("/nonexistent/checkpw /bin/true", {}, "not an executable file"),
        (str(PROGS), {}, "not an executable file"),
        ("no-such-checkpassword-prog /bin/true", {}, "not found in PATH"),
        ("   ", {}, "empty"),
        ("prog 'unbalanced", {}, "cannot parse"),
        (None, {}, "needs command"),
        (None, {"command": 42}, "command must be"),
        (None, {"command": []}, "command must be"),
        (None, {"command": [CHECKPW, ""]}, "command must be"),
        (None, {"command": CHECKPW, "timeout": 0}, "timeout"),
        (None, {"command": CHECKPW, "timeout": "10"}, "timeout"),
        (None, {"command": CHECKPW, "timeout": True}, "timeout"),
        (None, {"command": CHECKPW, "reject_codes": [0]}, "reject_codes"),
        (None, {"command": CHECKPW, "reject_codes": [111]}, "reject_codes"),
        (None, {"command": CHECKPW, "reject_codes": 1}, "reject_codes"),
        (None, {"command": CHECKPW, "reject_codes": []}, "reject_codes"),
        (None, {"command": CHECKPW, "colour": "blue"}, "unknown setting 'colour'"),
    ],
)
def test_bad_configuration_is_one_config_error(
    arg: str | None, options: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        create_backend(BackendSpec("checkpassword", arg=arg, options=options))
    assert complaint in str(caught.value)
    assert "\n" not in str(caught.value)


def test_concurrent_logins_do_not_serialize_behind_a_slow_program(
    client: ClientIdentity,
) -> None:
    auth = backend(prog("sleepy", 1))

    async def five() -> list[Outcome]:
        return await asyncio.gather(
            *(auth.verify(f"user{i}", Secret(b"pw"), client) for i in range(5))
        )

    started = time.monotonic()
    outcomes, worst = asyncio.run(with_ticker(five()))
    elapsed = time.monotonic() - started
    assert [o.verdict for o in outcomes] == [Verdict.ACCEPT] * 5
    assert elapsed < 2.5, f"five 1-second logins took {elapsed:.2f} s"
    assert worst < 0.1, f"event loop stalled {worst * 1000:.0f} ms"


def test_verify_latency_with_a_trivial_program(client: ClientIdentity) -> None:
    """Median verify() with /bin/true as the checkpassword program, against running it raw."""
    auth = backend("/bin/true")
    secret = Secret(b"pw")

    async def timed(n: int) -> list[float]:
        times = []
        for _ in range(n):
            started = time.perf_counter()
            outcome = await auth.verify("u", secret, client)
            times.append(time.perf_counter() - started)
            assert outcome.verdict is Verdict.ACCEPT
        return times

    median = statistics.median(asyncio.run(timed(100)))
    runs = timeit.repeat(
        lambda: subprocess.run(["/bin/true", "/bin/true"], stdin=subprocess.DEVNULL),
        number=20,
        repeat=5,
    )
    raw = min(runs) / 20
    print(
        f"\nverify() median {median * 1000:.2f} ms; subprocess.run(/bin/true) {raw * 1000:.2f} ms"
    )
    assert median < 0.05, f"verify() median {median * 1000:.1f} ms"
