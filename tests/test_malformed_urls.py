"""A malformed server URL or address in the configuration: one line and exit 2 at start-up,
and on SIGHUP one "reload failed" line while the daemon keeps serving."""

from __future__ import annotations

import signal
import smtplib
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.ofmipd_server import (
    CAPTURE,
    Daemon,
    authfile,
    captured_messages,
    ofmipd_command,
    server_env,
)

PASSWORD = "Reload-Pw-5"


@pytest.fixture
def users(tmp_path: Path) -> Path:
    return authfile(tmp_path, f"erin:{PASSWORD}\n")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ofmipd_command(*args), capture_output=True, text=True, timeout=30, env=server_env()
    )


def one_line_exit_2(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("ofmipd: ") and "Traceback" not in result.stderr
    return result.stderr


FLAGS = [
    ["-R", "ldap://[::1/uid=%s,dc=example,dc=org"],
    ["-R", "ldaps://[::1"],
    ["-R", "ldap://ldap.example.org:99999/uid=%s,dc=example,dc=org"],
    ["-R", "ldap://ldap.example.org:x/uid=%s,dc=example,dc=org"],
    ["-R", "imaps://[::1"],
    ["-R", "imaps://mail.example.org:99999"],
    ["-R", "imap://mail.example.org:x"],
    ["-R", "pop3://[::1]:0"],
    ["--ratelimit", "redis://[::1"],
    ["--ratelimit", "redis://127.0.0.1:99999/0"],
    ["--ratelimit", "redis://127.0.0.1:x/0"],
    ["--metrics", "[::1"],
    ["--metrics", "127.0.0.1:99999"],
    ["--metrics", "127.0.0.1:x"],
    ["--metrics", "127.0.0.1:\u00b2"],  # a digit to str.isdigit, not to int()
    ["-p", "127.0.0.1:\u00b2"],
]


@pytest.mark.parametrize("flags", FLAGS, ids=[" ".join(f) for f in FLAGS])
def test_a_malformed_url_or_address_flag_is_one_line_and_exit_2(
    users: Path, flags: list[str]
) -> None:
    one_line_exit_2(run("--check-config", "-a", str(users), *flags))


TOML = [
    '[[auth]]\nkind = "ldap"\nuri = ["ldap://127.0.0.1", "ldap://[::1"]\nbase = "dc=x"\n',
    '[[auth]]\nkind = "ldap"\nuri = "ldap://127.0.0.1:65536"\nbase = "dc=x"\n',
    '[[auth]]\nkind = "imap"\nurl = "imaps://[::1"\n',
    '[ratelimit]\nstore = "redis://[::1"\n',
    'metrics = "[::1"\n',
    'sender_map = "/etc/ofmipd/senders\\u0000"\n',  # no check foresees a NUL in a path
]


@pytest.mark.parametrize(
    "text", TOML, ids=["ldap-bracket", "ldap-port", "imap-bracket", "redis", "metrics", "nul"]
)
def test_a_malformed_toml_value_is_one_line_and_exit_2_at_start_up(
    tmp_path: Path, users: Path, text: str
) -> None:
    config = tmp_path / "ofmipd.toml"
    # In the file, not as -a: an authenticator flag would replace the file's [[auth]] list.
    config.write_text(f'{text}[[auth]]\nkind = "authfile"\npath = "{users}"\n')
    config.chmod(0o600)
    port = free_port()
    for extra in (["--check-config"], ["-p", f"127.0.0.1:{port}", "--sendmail", CAPTURE]):
        one_line_exit_2(run("--config", str(config), *extra))


def wait_for_line(daemon: Daemon, text: str, count: int, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = daemon.log_text()
        if log.count(text) >= count:
            return log
        time.sleep(0.05)
    raise AssertionError(f"no {count}th {text!r} in the log:\n{daemon.log_text()}")


def submit(daemon: Daemon, recipient: str) -> None:
    with smtplib.SMTP(daemon.host, daemon.port, timeout=20) as smtp:
        smtp.ehlo("client.test")
        smtp.login("erin", PASSWORD)
        smtp.sendmail("erin@example.org", [recipient], b"Subject: reload\r\n\r\nbody\r\n")


def test_sighup_with_a_malformed_url_keeps_the_running_configuration(
    tmp_path: Path, users: Path, capture: Path
) -> None:
    config = tmp_path / "ofmipd.toml"
    good = f'[[auth]]\nkind = "authfile"\npath = "{users}"\n[delivery]\nsendmail = "{CAPTURE}"\n'
    config.write_text(good)
    config.chmod(0o600)
    port = free_port()
    args = ["-p", f"127.0.0.1:{port}", "--hostname", "mx.test", "--config", str(config)]
    env = server_env(CAPTURE_DIR=str(capture))
    failed = "reload failed, keeping the running configuration: "
    bad_uri = good + '[[auth]]\nkind = "ldap"\nuri = "ldap://[::1"\nbase = "dc=x"\n'
    bad_path = 'sender_map = "/etc/ofmipd/senders\\u0000"\n' + good
    with Daemon(args, port, tmp_path, env=env) as daemon:
        for number, (text, reason) in enumerate(
            [
                (bad_uri, "'ldap://[::1': unbalanced [ ] around the host"),
                (bad_path, "ValueError: embedded null byte"),
            ],
            1,
        ):
            config.write_text(text)
            daemon.proc.send_signal(signal.SIGHUP)
            log = wait_for_line(daemon, failed, number)
            (line,) = [x for x in log.splitlines() if failed in x][number - 1 :]
            assert line.endswith(reason), line
            assert "Traceback" not in log
            submit(daemon, f"after-{number}@example.net")  # still serving, as before
        config.write_text(good)
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for_line(daemon, "configuration reloaded", 1)
        assert daemon.proc.poll() is None
    assert len(captured_messages(capture)) == 2
