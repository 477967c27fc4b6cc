"""URL passwords never leave the process: --check-config, configuration errors, logs and
ofmipd-authtest show them as ***; readable config and password files are warned about."""

from __future__ import annotations

import base64
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.ofmipd_server import CAPTURE, Daemon, authfile, ofmipd_command, server_env

SECRET = "Quokka-Redis-Secret-8841"  # distinctive: a leak cannot hide in other text
PASSWORD = "Erin-Login-Pw-3"


@pytest.fixture
def users(tmp_path: Path) -> Path:
    return authfile(tmp_path, f"erin:{PASSWORD}\n")


@pytest.fixture
def redis_port(tmp_path: Path) -> Iterator[int]:
    """A private redis-server that wants the password SECRET."""
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--requirepass", SECRET,
         "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None and time.monotonic() < deadline, "no redis-server"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                    conn.sendall(f"AUTH {SECRET}\r\nPING\r\n".encode())
                    time.sleep(0.05)
                    if b"+PONG" in conn.recv(64):
                        break
            except OSError:
                time.sleep(0.05)
        yield port
    finally:
        process.kill()
        process.wait(timeout=30)


def run(*args: str, module: str = "ofmipd") -> subprocess.CompletedProcess[str]:
    command = ofmipd_command(*args) if module == "ofmipd" else [sys.executable, "-m", module, *args]
    result = subprocess.run(
        command, input="", capture_output=True, text=True, timeout=60, env=server_env()
    )
    assert SECRET not in result.stdout + result.stderr, result
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_check_config_shows_a_redis_url_without_its_password(users: Path, redis_port: int) -> None:
    url = f"redis://:{SECRET}@127.0.0.1:{redis_port}/0"
    result = run("--check-config", "-a", str(users), "--ratelimit", url)
    assert result.returncode == 0, result.stderr
    assert f"login rate limit: redis redis://:***@127.0.0.1:{redis_port}/0" in result.stdout


@pytest.mark.slow
def test_a_daemon_reaches_redis_with_the_password_it_never_logs(
    tmp_path: Path, users: Path, capture: Path, redis_port: int
) -> None:
    config = tmp_path / "ofmipd.toml"
    config.write_text(
        f'[ratelimit]\nstore = "redis://:{SECRET}@127.0.0.1:{redis_port}/0"\nmax_failures = 2\n'
    )
    config.chmod(0o600)
    port = free_port()
    args = ["-p", f"127.0.0.1:{port}", "-a", str(users), "--sendmail", CAPTURE, "--debug"]
    with Daemon([*args, "--config", str(config)], port, tmp_path) as daemon:
        codes = []
        for _ in range(4):
            with smtplib.SMTP(daemon.host, daemon.port, timeout=20) as smtp:
                smtp.ehlo("client.test")
                blob = base64.b64encode(b"\0erin\0wrong").decode()
                codes.append(smtp.docmd("AUTH", f"PLAIN {blob}")[0])
        log = daemon.log_text()
    assert codes[-1] == 454, codes  # locked out: the lock lives in Redis, reached with SECRET
    keys = subprocess.run(
        ["redis-cli", "-p", str(redis_port), "--no-auth-warning", "-a", SECRET, "keys", "*"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert "ofmipd:rl:" in keys
    assert SECRET not in log


BAD = [
    ["--ratelimit", f"redis://:{SECRET}@127.0.0.1:x/0"],
    ["--ratelimit", f"redis://:{SECRET}@[::1"],
    ["--ratelimit", f"redis://:{SECRET}"],  # "@host" forgotten: the password reads as a port
    ["--ratelimit", f"ftp://:{SECRET}@127.0.0.1"],  # not a store at all
    ["-R", f"imaps://alice:{SECRET}@mail.example.org"],
    ["-R", f"imaps://alice:{SECRET}@mail.example.org:99999"],
    ["-R", f"imaps://alice:{SECRET}"],
    ["-R", f"ldap://cn=admin:{SECRET}@ldap.example.org/uid=%s,dc=example,dc=org"],
    ["-R", f"gopher://alice:{SECRET}@mail.example.org"],
]


@pytest.mark.slow
@pytest.mark.parametrize("flags", BAD, ids=[" ".join(f).replace(SECRET, "PW") for f in BAD])
def test_a_configuration_error_never_shows_a_url_password(users: Path, flags: list[str]) -> None:
    result = run("--check-config", "-a", str(users), *flags)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "***" in result.stderr


def test_a_configuration_error_in_toml_never_shows_a_url_password(
    tmp_path: Path, users: Path
) -> None:
    config = tmp_path / "ofmipd.toml"
    for text in (
        f'[[auth]]\nkind = "imap"\nurl = "imaps://alice:{SECRET}@mail.example.org"\n',
        f'[ratelimit]\nstore = "redis://:{SECRET}@127.0.0.1:99999/0"\n'
        f'[[auth]]\nkind = "authfile"\npath = "{users}"\n',
    ):
        config.write_text(text)
        config.chmod(0o600)
        result = run("--check-config", "--config", str(config))
        assert result.returncode == 2 and "***" in result.stderr, result.stderr


@pytest.mark.parametrize(
    "url",
    [
        f"imaps://alice:{SECRET}@mail.example.org",
        f"ldap://cn=admin:{SECRET}@ldap.example.org/uid=%s,dc=example,dc=org",
        f"pop3://alice:{SECRET}",
    ],
    ids=["imaps", "ldap", "pop3-no-host"],
)
def test_ofmipd_authtest_never_shows_a_url_password(url: str) -> None:
    result = run("-R", url, "erin", module="ofmipd.authtest")
    assert result.returncode == 2
    assert result.stderr.startswith("ofmipd-authtest: ") and "***" in result.stderr


@pytest.mark.slow
def test_readable_config_and_password_files_are_warned_about(tmp_path: Path, users: Path) -> None:
    password_file = tmp_path / "ldap.pw"
    password_file.write_text("service-secret\n")
    config = tmp_path / "ofmipd.toml"
    config.write_text(
        f'[[auth]]\nkind = "authfile"\npath = "{users}"\n'
        '[[auth]]\nkind = "ldap"\nuri = "ldap://127.0.0.1:1"\nbase = "dc=example,dc=org"\n'
        f'bind_dn = "cn=svc,dc=example,dc=org"\nbind_password_file = "{password_file}"\n'
    )
    for config_mode, file_mode, expected in (
        (0o600, 0o600, []),
        (0o644, 0o600, [f"config {config} is world-readable (mode 0644)"]),
        (0o640, 0o640, [f"config {config} is group-readable (mode 0640)",
                        f"bind_password_file {password_file} is group-readable (mode 0640)"]),
    ):  # fmt: skip
        config.chmod(config_mode)
        password_file.chmod(file_mode)
        result = run("--check-config", "--config", str(config))
        assert result.returncode == 0, result.stderr
        warnings = [x for x in result.stdout.splitlines() if x.startswith("warning: ")]
        assert len(warnings) == len(expected), result.stdout
        for text in expected:
            assert any(text in line for line in warnings), (text, warnings)
        authtest = run("--config", str(config), "--all", "erin", module="ofmipd.authtest")
        for text in expected:
            assert text in authtest.stderr, authtest.stderr
    # A daemon says it once at start-up, in its log.
    config.chmod(0o644)
    port = free_port()
    with Daemon(["-p", f"127.0.0.1:{port}", "--config", str(config)], port, tmp_path) as daemon:
        log = daemon.log_text()
    assert log.count(f"config {config} is world-readable (mode 0644)") == 1
