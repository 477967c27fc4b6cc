"""The real msmtp (GNU SASL) logs in with SCRAM to a real ofmipd over a passwd-file whose
entries were made by `ofmipd-passwd` and by Dovecot's `doveadm pw`, with and without TLS."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.conftest import free_port
from tests.ofmipd_server import CAPTURE, Daemon, captured_messages, server_env
from tests.tls_support import make_certificate

ROOT = Path(__file__).resolve().parent.parent
MESSAGE = b"From: someone@example.org\r\nSubject: scram\r\n\r\nbody\r\n"
PASSWORD = "Kestrel-Pumice-3391"


class Login(NamedTuple):
    user: str
    password: str
    made_by: str  # for the assertion messages


def ofmipd_passwd(path: Path, *args: str, stdin: str = PASSWORD + "\n") -> str:
    result = subprocess.run(
        [sys.executable, "-m", "ofmipd.passwd", "--file", str(path), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
        check=True,
    )
    return result.stdout


def doveadm_pw(scheme: str, password: str) -> str:
    result = subprocess.run(
        ["doveadm", "pw", "-s", scheme, "-p", password], capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Login]]:
    """alice: main password and an app password by ofmipd-passwd (SCRAM-SHA-256, one
    salt); dave: SCRAM-SHA-1 by ofmipd-passwd; bob and carol: `doveadm pw` lines; erin: an
    app password only allowed from 127.0.0.1."""
    path = tmp_path_factory.mktemp("users") / "users"
    ofmipd_passwd(path, "add", "alice")
    tablet = ofmipd_passwd(path, "app-add", "alice", "tablet").split()[-1]
    ofmipd_passwd(path, "add", "dave", "--scheme", "SCRAM-SHA-1", stdin="dave-Sha1-pw\n")
    erin = ofmipd_passwd(path, "app-add", "erin", "desk", "--allow-nets", "127.0.0.1/32")
    with path.open("a") as handle:
        handle.write(f"bob:{doveadm_pw('SCRAM-SHA-256', 'bob-Dovecot-256')}\n")
        handle.write(f"carol:{doveadm_pw('SCRAM-SHA-1', 'carol-Dovecot-1')}\n")
    logins = [
        Login("alice", PASSWORD, "ofmipd-passwd add"),
        Login("alice", tablet, "ofmipd-passwd app-add"),
        Login("dave", "dave-Sha1-pw", "ofmipd-passwd add --scheme SCRAM-SHA-1"),
        Login("bob", "bob-Dovecot-256", "doveadm pw -s SCRAM-SHA-256"),
        Login("carol", "carol-Dovecot-1", "doveadm pw -s SCRAM-SHA-1"),
        Login("erin", erin.split()[-1], "ofmipd-passwd app-add --allow-nets"),
    ]
    return path, logins


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_certificate(tmp_path_factory.mktemp("cert"))


def start(tmp_path: Path, users: Path, cert: tuple[Path, Path], *extra: str) -> Daemon:
    """ofmipd with the passwd-file, TLS on offer (STARTTLS) and the capture injector."""
    capture = tmp_path / "capture"
    capture.mkdir(exist_ok=True)
    port = free_port()
    args = ["-p", f"127.0.0.1:{port}", "--hostname", "mx.test", "--passwd-file", str(users),
            "--sendmail", CAPTURE, "--ratelimit", "off", "--state-dir", str(tmp_path / "state"),
            "--ssl-cert", str(cert[0]), "--ssl-key", str(cert[1]), "--tls", "optional",
            *extra]  # fmt: skip
    return Daemon(args, port, tmp_path, env=server_env(CAPTURE_DIR=str(capture)))


def msmtp(
    daemon: Daemon, tmp_path: Path, cert: Path | None, login: Login, auth: str, *extra: str
) -> subprocess.CompletedProcess[bytes]:
    """One message through the real msmtp; `cert`: STARTTLS, trusting it (None: no TLS)."""
    rc = tmp_path / "msmtprc"
    rc.write_text("")
    rc.chmod(0o600)
    secret = tmp_path / "secret"
    secret.write_text(login.password)
    tls = ("--tls=on", "--tls-starttls=on", f"--tls-trust-file={cert}",
           "--tls-host-override=mx.test") if cert else ("--tls=off",)  # fmt: skip
    return subprocess.run(
        ["msmtp", "-C", str(rc), f"--host={daemon.host}", f"--port={daemon.port}",
         f"--auth={auth}", f"--user={login.user}", f"--passwordeval=cat {secret}",
         "--from=someone@example.org", "--domain=client.test", *tls, *extra, "--",
         "rcpt@example.net"],
        input=MESSAGE, capture_output=True, timeout=60,
    )  # fmt: skip


def accepted(daemon: Daemon) -> list[tuple[str, str]]:
    """(user, mechanism) of each accepted login in the daemon's log, in order."""
    return re.findall(r"auth accept: client=\S+ user=(\S+) mechanism=(\S+) ", daemon.log_text())


def ehlo_mechanisms(daemon: Daemon, cert: Path | None) -> list[str]:
    import smtplib

    from tests.tls_support import client_context

    with smtplib.SMTP(daemon.host, daemon.port, timeout=20) as s:
        s.ehlo()
        if cert:
            s.starttls(context=client_context(cert))
            s.ehlo()
        return s.esmtp_features["auth"].split()


def auth_for(login: Login) -> str:
    return "scram-sha-1" if "SHA-1" in login.made_by else "scram-sha-256"


@pytest.mark.slow
@pytest.mark.parametrize("tls", [False, True], ids=["plain-text", "starttls"])
def test_msmtp_logs_in_with_scram_to_entries_from_ofmipd_passwd_and_doveadm(
    tmp_path: Path, users: tuple[Path, list[Login]], cert: tuple[Path, Path], tls: bool
) -> None:
    path, logins = users
    trust = cert[0] if tls else None
    with start(tmp_path, path, cert) as daemon:
        offered = ehlo_mechanisms(daemon, trust)
        # Every mechanism is on offer (-PLUS with TLS): msmtp must still log in.
        plus = ["SCRAM-SHA-256-PLUS"] if tls else []
        assert offered == ["PLAIN", "LOGIN", "SCRAM-SHA-1", "SCRAM-SHA-256", *plus]
        for login in logins:
            result = msmtp(daemon, tmp_path, trust, login, auth_for(login))
            assert result.returncode == 0, (login.made_by, result.stderr)
            wrong = msmtp(daemon, tmp_path, trust, login._replace(password="Wrong-9"),
                          auth_for(login))  # fmt: skip
            assert wrong.returncode != 0 and b"535" in wrong.stderr, (login.made_by, wrong)
        log = daemon.log_text()
        messages = captured_messages(tmp_path / "capture")
    # GNU SASL binds only with tls-unique/tls-exporter, so with TLS it too picks the
    # unbound SCRAM (saying 'n', not 'y': it is not taken for a downgrade).
    expected = [(login.user, auth_for(login).upper()) for login in logins]
    assert accepted(daemon) == expected, log
    assert "-PLUS" not in "".join(m for _, m in accepted(daemon))
    assert len(messages) == len(logins)
    assert all(f"LOGIN={login.user}\n" in env for login, (env, _) in zip(logins, messages))
    assert "app password 'tablet'" in log and "app password 'desk'" in log
    assert log.count("proof mismatch") == len(logins)
    for login in logins:
        assert login.password not in log


@pytest.mark.slow
def test_msmtp_auth_on_picks_scram_in_clear_and_plain_inside_tls(
    tmp_path: Path, users: tuple[Path, list[Login]], cert: tuple[Path, Path]
) -> None:
    path, logins = users
    with start(tmp_path, path, cert) as daemon:
        for trust in (None, cert[0]):
            result = msmtp(daemon, tmp_path, trust, logins[0], "on")
            assert result.returncode == 0, result.stderr
    assert accepted(daemon) == [("alice", "SCRAM-SHA-256"), ("alice", "PLAIN")]


@pytest.mark.slow
def test_msmtp_app_password_scope_holds_for_scram(
    tmp_path: Path, users: tuple[Path, list[Login]], cert: tuple[Path, Path]
) -> None:
    path, logins = users
    erin = next(login for login in logins if login.user == "erin")
    with start(tmp_path, path, cert) as daemon:
        outside = msmtp(daemon, tmp_path, None, erin, "scram-sha-256", "--source-ip=127.0.0.2")
        assert outside.returncode != 0 and b"535" in outside.stderr, outside
        inside = msmtp(daemon, tmp_path, None, erin, "scram-sha-256", "--source-ip=127.0.0.1")
        assert inside.returncode == 0, inside.stderr
        log = daemon.log_text()
    assert (
        "auth reject: client=127.0.0.2 user=erin mechanism=SCRAM-SHA-256 backend=passwd-file "
        "reason='SCRAM-SHA-256: app password 'desk' of erin is not allowed from 127.0.0.2: "
        "allow_nets=127.0.0.1/32'"
    ) in log
    assert accepted(daemon) == [("erin", "SCRAM-SHA-256")]


@pytest.mark.slow
def test_server_final_in_the_235_suits_scramp_but_not_msmtp(
    tmp_path: Path, users: tuple[Path, list[Login]], cert: tuple[Path, Path]
) -> None:
    """Why --scram-final defaults to 334: GNU SASL wants the server-final in a challenge.
    Given it in the 235, msmtp answers a command the server cannot parse and gives up,
    though the server had accepted the proof. scramp's client takes it in the 235."""
    import base64
    import smtplib

    from scramp import ScramClient

    path, logins = users
    bob = next(login for login in logins if login.user == "bob")
    with start(tmp_path, path, cert, "--scram-final", "235") as daemon:
        result = msmtp(daemon, tmp_path, None, bob, "scram-sha-256")
        assert result.returncode != 0
        assert b"authentication failed (method SCRAM-SHA-256)" in result.stderr, result.stderr
        with smtplib.SMTP(daemon.host, daemon.port, timeout=20) as s:
            s.ehlo()
            client = ScramClient(["SCRAM-SHA-256"], bob.user, bob.password)
            first = base64.b64encode(client.get_client_first().encode()).decode()
            code, text = s.docmd("AUTH", f"SCRAM-SHA-256 {first}")
            client.set_server_first(base64.b64decode(text).decode())
            code, text = s.docmd(base64.b64encode(client.get_client_final().encode()).decode())
            assert code == 235
            client.set_server_final(base64.b64decode(text).decode())  # the server's proof
            s.sendmail("someone@example.org", ["rcpt@example.net"], MESSAGE)
    assert accepted(daemon) == [("bob", "SCRAM-SHA-256")] * 2
    assert len(captured_messages(tmp_path / "capture")) == 1


@pytest.mark.slow
def test_a_plus_only_app_password_logs_in_bound_and_not_unbound(
    tmp_path: Path, cert: tuple[Path, Path]
) -> None:
    """mechanisms=SCRAM-SHA-256-PLUS: only a login bound to ofmipd's TLS channel."""
    import base64
    import smtplib

    from scramp import ScramClient

    from tests.tls_support import client_context

    path = tmp_path / "users"
    ofmipd_passwd(path, "add", "alice")
    out = ofmipd_passwd(path, "app-add", "alice", "bound", "--mechanisms", "SCRAM-SHA-256-PLUS")
    password = out.split()[-1]

    def login(mechanism: str) -> int:
        with smtplib.SMTP(daemon.host, daemon.port, timeout=20) as s:
            s.starttls(context=client_context(cert[0]))
            s.ehlo()
            binding = ("tls-server-end-point", s.sock) if mechanism.endswith("-PLUS") else None
            client = ScramClient([mechanism], "alice", password, binding)
            first = base64.b64encode(client.get_client_first().encode()).decode()
            _, text = s.docmd("AUTH", f"{mechanism} {first}")
            client.set_server_first(base64.b64decode(text).decode())
            code, text = s.docmd(base64.b64encode(client.get_client_final().encode()).decode())
            if code == 334:
                client.set_server_final(base64.b64decode(text).decode())
                code, text = s.docmd("")
            return code

    with start(tmp_path, path, cert) as daemon:
        assert login("SCRAM-SHA-256-PLUS") == 235
        assert login("SCRAM-SHA-256") == 535
        log = daemon.log_text()
    assert accepted(daemon) == [("alice", "SCRAM-SHA-256-PLUS")]
    assert "proof matches (app password 'bound')" in log
    assert "app password 'bound' of alice is limited to mechanisms=SCRAM-SHA-256-PLUS" in log
