"""ofmipd-authtest as the admin runs it, against real backends: verdicts, reasons, exit codes."""

from __future__ import annotations

import json
import os
import pty
import re
import secrets
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import ldap_server
from tests.dovecot_server import Dovecot
from tests.ldap_server import PEOPLE

slapd = ldap_server.slapd
PLAIN_UNIX = "auth required pam_unix.so nodelay\naccount required pam_unix.so\n"

AUTHTEST = str(Path(sys.executable).parent / "ofmipd-authtest")
PASSWORD = "Zebra-Quokka-7731-distinct"  # distinctive, so a leak cannot hide in other text
LINE = re.compile(r"^(\S+) (.+): (accept|reject|tempfail) \((.*)\) (\d+\.\d) ms$")


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def program(path: Path, body: str) -> str:
    return str(write(path, f"#!/bin/sh\n{body}\n", 0o755))


@pytest.fixture
def authfile(tmp_path: Path) -> Path:
    return write(tmp_path / "users", f"alice:{PASSWORD}\nbob:other-pw\n")


def authtest(*args: str, password: str | None = PASSWORD, secrets_: tuple[str, ...] = ()):
    """Run the installed console script; the password never shows in either stream."""
    assert os.access(AUTHTEST, os.X_OK), "run .venv/bin/pip install -e . (console script)"
    result = subprocess.run(
        [AUTHTEST, *args],
        input=None if password is None else (password + "\n").encode(),
        stdin=subprocess.DEVNULL if password is None else None,
        capture_output=True,
        timeout=120,
    )
    out, err = result.stdout.decode(), result.stderr.decode()
    for secret in (PASSWORD, *secrets_) + ((password,) if password else ()):
        assert secret not in out and secret not in err, (out, err)
    assert "Traceback" not in err, err
    return result.returncode, out, err


def attempts(out: str) -> list[tuple[str, str, str, str]]:
    """(backend, target, verdict, reason) for each backend line of the text output."""
    found = []
    for line in out.splitlines():
        m = LINE.match(line)
        if m:
            found.append((m[1], m[2], m[3], m[4]))
    return found


def result_line(out: str) -> str:
    last = out.strip().splitlines()[-1]
    assert last.startswith("result: "), out
    return last


def one_line_exit_2(code: int, out: str, err: str, *words: str) -> None:
    assert code == 2, (out, err)
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("ofmipd-authtest: ")
    for word in words:
        assert word in err, err


@pytest.fixture
def make_user() -> Iterator[Callable[[], tuple[str, str]]]:
    """Real system users with random names and passwords, deleted afterwards."""
    created: list[str] = []

    def make() -> tuple[str, str]:
        name = f"ofmtest_{secrets.token_hex(4)}"
        password = f"pw {secrets.token_urlsafe(12)} \u00e9"
        subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", name], check=True)
        created.append(name)
        subprocess.run(["chpasswd"], input=f"{name}:{password}\n".encode(), check=True)
        return name, password

    yield make
    for name in created:
        subprocess.run(["userdel", "-f", name], capture_output=True)


@pytest.fixture
def make_service() -> Iterator[Callable[[str], str]]:
    """Real /etc/pam.d/ofmipd-test-<random> services, removed afterwards."""
    created: list[Path] = []

    def make(text: str) -> str:
        path = Path("/etc/pam.d") / f"ofmipd-test-{secrets.token_hex(4)}"
        path.write_text(text)
        created.append(path)
        return path.name

    yield make
    for path in created:
        path.unlink(missing_ok=True)


# ---- authfile, htpasswd, checkpassword ---------------------------------------------------


def test_authfile_accept_prints_backend_target_verdict_reason_time(authfile) -> None:
    code, out, _ = authtest("-a", str(authfile), "alice")
    assert code == 0
    assert attempts(out) == [("authfile", str(authfile), "accept", "password matches")]
    assert result_line(out).startswith("result: accept for user alice: accepted by authfile (")
    assert "client hears: 235 2.7.0 Authentication successful" in out


def test_authfile_wrong_password_and_unknown_user_reject_with_exit_1(authfile) -> None:
    code, out, _ = authtest("-a", str(authfile), "alice", password="not-the-password")
    assert code == 1
    assert attempts(out) == [
        ("authfile", str(authfile), "reject", f"password mismatch for alice in {authfile}")
    ]
    assert "client hears: 535 5.7.8" in out
    code, out, _ = authtest("-a", str(authfile), "mallory")
    assert code == 1
    assert attempts(out)[0][3] == f"no such user in {authfile}"
    assert result_line(out).startswith("result: reject for user mallory: no backend accepted")


def test_htpasswd_bcrypt_file_made_by_htpasswd(tmp_path) -> None:
    path = tmp_path / "htpasswd"
    subprocess.run(
        ["htpasswd", "-B", "-b", "-c", str(path), "carol", PASSWORD],
        check=True,
        capture_output=True,
    )
    stored = path.read_text().split(":", 1)[1].strip()
    assert stored.startswith("$2y$")
    code, out, _ = authtest("--htpasswd", str(path), "carol", secrets_=(stored,))
    assert code == 0
    assert attempts(out)[0][:3] == ("htpasswd", str(path), "accept")
    code, out, _ = authtest("--htpasswd", str(path), "carol", password="wrong", secrets_=(stored,))
    assert code == 1
    assert attempts(out)[0][3] == f"password mismatch for carol in {path}"


def test_checkpassword_exit_codes_become_verdicts(tmp_path) -> None:
    ok = program(tmp_path / "ok", 'cat <&3 >/dev/null; exec "$@"')
    no = program(tmp_path / "no", "cat <&3 >/dev/null; exit 1")
    later = program(tmp_path / "later", "cat <&3 >/dev/null; exit 111")
    code, out, _ = authtest("-A", ok, "dave")
    assert (code, attempts(out)[0][2:]) == (0, ("accept", "checkpassword exit 0"))
    code, out, _ = authtest("-A", no, "dave")
    assert (code, attempts(out)[0][2:]) == (1, ("reject", "checkpassword exit 1"))
    code, out, _ = authtest("-A", later, "dave")
    assert (code, attempts(out)[0][2:]) == (111, ("tempfail", "checkpassword exit 111"))
    assert "client hears: 454 4.7.0" in out
    assert "temporary failure of checkpassword" in result_line(out)


def test_stops_at_first_accept_unless_all(tmp_path, authfile) -> None:
    marker = tmp_path / "second-ran"
    second = program(tmp_path / "second", f"cat <&3 >/dev/null; touch {marker}; exit 1")
    code, out, _ = authtest("-a", str(authfile), "-A", second, "alice")
    assert code == 0
    assert [a[0] for a in attempts(out)] == ["authfile"]
    assert not marker.exists()
    code, out, _ = authtest("-a", str(authfile), "-A", second, "--all", "alice")
    assert code == 0
    assert [(a[0], a[2]) for a in attempts(out)] == [
        ("authfile", "accept"),
        ("checkpassword", "reject"),
    ]
    assert marker.exists()


def test_tempfail_and_reject_give_tempfail_but_a_later_accept_wins(tmp_path, authfile) -> None:
    later = program(tmp_path / "later", "cat <&3 >/dev/null; exit 111")
    code, out, _ = authtest("-A", later, "-a", str(authfile), "mallory")
    assert code == 111
    assert [a[2] for a in attempts(out)] == ["tempfail", "reject"]
    code, out, _ = authtest("-A", later, "-a", str(authfile), "alice")
    assert code == 0
    assert [a[2] for a in attempts(out)] == ["tempfail", "accept"]


def test_tempfail_names_the_backend_that_failed_not_the_last_one_asked(authfile) -> None:
    # LDAP is down, then the authfile says "no such user": the verdict is TEMPFAIL because
    # of LDAP, and that is what the output must name (the log line too: test_identity.py).
    from tests.conftest import free_port

    dead = f"ldap://127.0.0.1:{free_port()}/uid=%s,{PEOPLE}"
    code, out, _ = authtest("--json", "-R", dead, "-a", str(authfile), "mallory")
    doc = json.loads(out)
    assert (code, doc["credentials"], doc["decided_by"]) == (111, "tempfail", "ldap")
    code, out, _ = authtest("-R", dead, "-a", str(authfile), "mallory")
    assert code == 111
    assert "temporary failure of ldap;" in result_line(out)
    code, out, _ = authtest("--json", "-R", dead, "-a", str(authfile), "alice")
    assert (code, json.loads(out)["decided_by"]) == (0, "authfile")


# ---- LDAP and PAM ------------------------------------------------------------------------


@pytest.mark.slow
def test_ldap_accept_reject_and_server_down(slapd) -> None:
    url = f"{slapd.uri}/uid=%s,{PEOPLE}"
    target = f"{slapd.uri} uid=%s,{PEOPLE}"
    code, out, _ = authtest("-R", url, "alice", password="alice-pw")
    assert code == 0, out
    assert attempts(out) == [("ldap", target, "accept", f"LDAP bind as uid=alice,{PEOPLE}")]
    # The directory folds case; the result names the entry's uid, not what was typed.
    code, out, _ = authtest("-R", url, "ALICE", password="alice-pw")
    assert code == 0, out
    assert result_line(out).startswith("result: accept for user alice: accepted by ldap")
    code, out, _ = authtest("-R", url, "alice", password="wrong-pw", secrets_=("alice-pw",))
    assert code == 1
    assert attempts(out) == [("ldap", target, "reject", "LDAP invalidCredentials")]
    slapd.stop()
    code, out, err = authtest("-R", url, "alice", password="alice-pw")
    assert code == 111, (out, err)
    [(kind, shown, verdict, reason)] = attempts(out)
    assert (kind, shown, verdict) == ("ldap", target, "tempfail")
    assert reason == f"LDAP serverDown at {slapd.uri}"
    assert "client hears: 454 4.7.0" in out


def test_pam_real_user_and_service(make_user, make_service) -> None:
    user, password = make_user()
    service = make_service(PLAIN_UNIX)
    code, out, _ = authtest("-m", service, user, password=password)
    assert code == 0, out
    assert attempts(out)[0][:3] == ("pam", f"PAM service {service}", "accept")
    code, out, _ = authtest("-m", service, user, password=password + "x", secrets_=(password,))
    assert code == 1
    assert attempts(out)[0][3] == "pam_authenticate PAM_AUTH_ERR: Authentication failure"


# ---- JSON, secrets, the prompt ---------------------------------------------------------


def test_json_parses_and_matches_the_text_output(tmp_path, authfile) -> None:
    later = program(tmp_path / "later", "cat <&3 >/dev/null; exit 111")
    for user, want in (("alice", 0), ("mallory", 111), ("bob", 111)):
        args = ("-A", later, "-a", str(authfile), "--all", user)
        code, text, _ = authtest(*args)
        json_code, out, _ = authtest("--json", *args)
        doc = json.loads(out)
        assert code == json_code == doc["exit"] == want
        assert [
            (a["backend"], a["target"], a["verdict"], a["reason"]) for a in doc["attempts"]
        ] == (attempts(text))
        assert result_line(text).startswith(f"result: {doc['verdict']} for user {doc['user']}: ")
        assert doc["why"] in result_line(text)
        assert f"client hears: {doc['smtp_reply']}" in text
        assert doc["client"]["remote_ip"] == "127.0.0.1"


def test_password_appears_in_no_stream_even_on_failure(tmp_path) -> None:
    # A program that echoes what it gets on fd 3 to stderr: the checkpassword backend logs
    # that (a tempfail is a warning) with the password cut out, in text and JSON mode alike.
    noisy = program(tmp_path / "noisy", "tr '\\0' ' ' <&3 >&2; echo >&2; exit 111")
    for extra in ((), ("--json",)):
        code, out, err = authtest(*extra, "-A", noisy, "alice")  # authtest() checks streams
        assert code == 111
        assert "alice" in out
        assert "alice <redacted>" in err
    code, out, err = authtest("--json", "-a", str(tmp_path / "missing"), "alice")
    assert code == 2 and "missing" in err


def test_prompt_on_a_terminal_does_not_echo(authfile) -> None:
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin, stdout and stderr are the pty, as in a terminal
        os.execv(AUTHTEST, [AUTHTEST, "-a", str(authfile), "alice"])
    seen = b""
    try:
        seen = read_until(fd, b"Password:", seen)
        os.write(fd, PASSWORD.encode() + b"\r")
        seen = read_until(fd, b"result: ", seen)
        seen = read_until(fd, None, seen)  # to EOF
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    text = seen.decode(errors="replace")
    assert PASSWORD not in text, text
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "authfile" in text and "accept" in text


def read_until(fd: int, marker: bytes | None, seen: bytes, timeout: float = 60.0) -> bytes:
    deadline = time.monotonic() + timeout
    while marker is None or marker not in seen:
        assert time.monotonic() < deadline, f"no {marker!r} in {seen!r}"
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            chunk = b""
        if not chunk:
            assert marker is None, f"EOF before {marker!r} in {seen!r}"
            return seen
        seen += chunk
    return seen


# ---- client rules and ipauthmap --------------------------------------------------------


@pytest.fixture
def rules(tmp_path) -> Path:
    return write(
        tmp_path / "rules",
        '192.0.2.66 deny "Your host is blocked"\n10.0.0.0/8 require-tls\n127.0.0.1 relay\n',
        0o644,
    )


def test_host_rules_for_remote_ip_are_shown_and_applied(authfile, rules) -> None:
    base = ("-a", str(authfile), "--rules", str(rules))
    code, out, _ = authtest(*base, "--remote-ip", "192.0.2.66", "alice")
    assert code == 1
    assert out.startswith(f"client 192.0.2.66: rule at {rules}:1 (192.0.2.66 deny): denied")
    assert "client hears: 554 5.7.1 Your host is blocked" in out
    assert "credentials: accept" in result_line(out)
    code, out, _ = authtest(*base, "--remote-ip", "10.1.2.3", "alice")
    assert code == 1  # require-tls, but this configuration has no TLS at all
    assert "AUTH only after STARTTLS (no TLS!)" in out
    code, out, _ = authtest(*base, "--remote-ip", "10.1.2.3", "--tls", "optional", "alice")
    assert code == 0
    assert "AUTH only after STARTTLS" in out and "no TLS!" not in out
    code, out, _ = authtest(*base, "--remote-ip", "::ffff:127.0.0.1", "alice")
    assert code == 0
    assert f"rule at {rules}:3 (127.0.0.1 relay): may relay without AUTH" in out
    code, out, _ = authtest(*base, "--remote-ip", "198.51.100.1", "alice")
    assert out.startswith("client 198.51.100.1: default rule (allow)\n")
    code, out, _ = authtest("-a", str(authfile), "--remote-ip", "192.0.2.66", "alice")
    assert code == 0
    assert out.startswith("client 192.0.2.66: no host rules configured\n")


def test_rules_come_from_the_config_file(tmp_path, authfile, rules) -> None:
    conf = write(
        tmp_path / "ofmipd.toml",
        f'rules = "{rules}"\n[tls]\nmode = "on"\ncert = "/nonexistent"\n'
        f'[[auth]]\nkind = "authfile"\npath = "{authfile}"\n',
    )
    code, out, _ = authtest("--config", str(conf), "--remote-ip", "192.0.2.66", "alice")
    assert code == 1 and "deny" in out.splitlines()[0]
    code, out, _ = authtest("--config", str(conf), "--remote-ip", "198.51.100.1", "alice")
    assert code == 0  # tls mode "on": every client must use STARTTLS, and it can
    assert "AUTH only after STARTTLS" in out.splitlines()[0]
    tables = write(
        tmp_path / "tables.toml",
        '[[rule]]\nmatch = ["192.0.2.0/24", "198.51.100.7"]\naction = "deny"\n'
        'message = "Not from there"\n'
        f'[[auth]]\nkind = "authfile"\npath = "{authfile}"\n',
    )
    code, out, _ = authtest("--config", str(tables), "--remote-ip", "198.51.100.7", "alice")
    assert code == 1
    assert f"rule at {tables} [[rule]] #1 (198.51.100.7 deny)" in out
    assert "client hears: 554 5.7.1 Not from there" in out


@pytest.mark.slow
def test_ipauthmap_routes_by_local_ip_to_a_real_imap_server(tmp_path) -> None:
    with Dovecot({"erin": PASSWORD}, tls=False) as imap:
        port = imap.ports["imap"]
        ipmap = write(tmp_path / "ipauthmap", f"127.0.0.2 127.0.0.1 {port}\n", 0o644)
        url = f"imap://0.0.0.0:{port}?ipauthmap={ipmap}&fallback=none"
        code, out, _ = authtest("-R", url, "--local-ip", "127.0.0.2", "erin")
        assert code == 0, out
        assert f"imap ipauthmap {ipmap}: local 127.0.0.2 -> 127.0.0.1:{port}" in out
        [(kind, target, verdict, reason)] = attempts(out)
        assert (kind, target, verdict) == (
            "imap",
            f"imap://0.0.0.0:{port} ipauthmap={ipmap}",
            "accept",
        )
        assert reason.startswith(f"127.0.0.1:{port}: ")
        code, out, _ = authtest("-R", url, "--local-ip", "127.0.0.2", "erin", password="wrong")
        assert code == 1
        code, out, _ = authtest("-R", url, "--local-ip", "127.0.0.9", "erin")
        assert code == 111
        assert "no entry for local address 127.0.0.9" in out
        code, out, _ = authtest("--json", "-R", url, "--local-ip", "127.0.0.2", "erin")
        assert json.loads(out)["client"]["ipauthmap"] == [
            f"imap ipauthmap {ipmap}: local 127.0.0.2 -> 127.0.0.1:{port}"
        ]


# ---- usage and configuration errors: exit 2, one line ---------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--config", "/nonexistent/ofmipd.toml", "alice"), ("No such file",)),
        (("alice",), ("no authenticator",)),
        (("-a", "/nonexistent/users", "alice"), ("/nonexistent/users",)),
        (("-R", "gopher://x", "alice"), ("unknown remote authentication scheme",)),
        (("-A", "/bin/true"), ("which user",)),
        (("-A", "/bin/true", "--remote-ip", "not-an-ip", "alice"), ("--remote-ip",)),
        (("-A", "/bin/true", "--bogus", "alice"), ("unrecognized arguments",)),
    ],
)
def test_bad_usage_or_config_exits_2_with_one_line(args, words) -> None:
    one_line_exit_2(*authtest(*args), *words)


def test_bad_toml_and_unknown_kind_exit_2(tmp_path) -> None:
    broken = write(tmp_path / "broken.toml", "[[auth]\nkind = \n")
    one_line_exit_2(*authtest("--config", str(broken), "alice"), str(broken))
    unknown = write(tmp_path / "unknown.toml", '[[auth]]\nkind = "kerberos"\n')
    one_line_exit_2(*authtest("--config", str(unknown), "alice"), "kerberos")


def test_no_password_on_stdin_exits_2(authfile) -> None:
    one_line_exit_2(*authtest("-a", str(authfile), "alice", password=None), "no password")


def test_empty_password_is_refused_at_the_door(authfile) -> None:
    code, out, _ = authtest("-a", str(authfile), "alice", password="")
    assert code == 1
    assert attempts(out) == [("door", "-", "reject", "malformed credentials: empty password")]


def test_distinct_users_each_get_their_own_verdict(tmp_path) -> None:
    users = {f"u{secrets.token_hex(3)}": f"pw-{secrets.token_hex(8)}" for _ in range(3)}
    path = write(tmp_path / "many", "".join(f"{u}:{p}\n" for u, p in users.items()))
    for user, password in users.items():
        code, out, _ = authtest("-a", str(path), user, password=password)
        assert code == 0 and f"for user {user}:" in out
