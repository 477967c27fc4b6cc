"""Command line and TOML configuration: tmda-ofmipd compatibility, one-line errors, exit 2."""

from __future__ import annotations

import socket
import subprocess

import pytest

from tests.conftest import free_port
from tests.ofmipd_server import CAPTURE, ofmipd_command, server_env


def run(*args: str, stdin: bytes = b"", env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ofmipd_command(*args), input=stdin, capture_output=True, timeout=30, env=env or server_env()
    )


@pytest.fixture
def users(tmp_path):
    path = tmp_path / "users"
    path.write_text("erin:pw-erin\n")
    path.chmod(0o600)
    return path


def one_line_exit_2(result: subprocess.CompletedProcess, *words: str) -> None:
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("ofmipd: ")
    for word in words:
        assert word in err, err
    assert b"Traceback" not in result.stderr


def test_no_authenticator_is_an_error():
    one_line_exit_2(run("-1"), "no authenticator")


def test_world_readable_authfile_is_refused(users):
    users.chmod(0o644)
    one_line_exit_2(run("-1", "-a", str(users)), str(users), "0644")


def test_missing_authfile_is_refused(tmp_path):
    one_line_exit_2(run("-1", "-a", str(tmp_path / "nope")), "nope")


def test_unknown_option_is_one_line():
    one_line_exit_2(run("--no-such-flag"), "--no-such-flag")


def test_bad_tls_mode_is_one_line(users):
    one_line_exit_2(run("-a", str(users), "--tls", "sometimes"), "sometimes")


def test_unknown_remote_scheme(users):
    one_line_exit_2(run("-R", "gopher://x", "-a", str(users)), "gopher")


def test_missing_sendmail_program(users):
    one_line_exit_2(
        run("-1", "-a", str(users), "--sendmail", "/nonexistent/sendmail"), "/nonexistent/sendmail"
    )


def test_port_in_use_is_one_line(users):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        one_line_exit_2(
            run("-p", f"127.0.0.1:{port}", "-a", str(users), "--sendmail", CAPTURE), str(port)
        )


def test_bad_toml_is_one_line(tmp_path, users):
    conf = tmp_path / "ofmipd.toml"
    conf.write_text("listen = [\n")
    one_line_exit_2(run("--config", str(conf), "-a", str(users)), str(conf))


def test_unknown_toml_setting_is_named(tmp_path, users):
    conf = tmp_path / "ofmipd.toml"
    conf.write_text('lisen = "127.0.0.1:25"\n')
    one_line_exit_2(run("--config", str(conf), "-a", str(users)), "lisen")


def test_toml_expresses_the_configuration_and_flags_win(tmp_path, users):
    conf = tmp_path / "ofmipd.toml"
    conf.write_text(f"""
hostname = "from-toml.test"
listen = ["127.0.0.1:2525", "[::1]:2525"]
connections = 7

[delivery]
sendmail = "{CAPTURE}"

[[auth]]
kind = "authfile"
path = "{users}"
""")
    result = run("--config", str(conf), "--check-config")
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr
    assert "hostname: from-toml.test" in out
    assert "127.0.0.1:2525, [::1]:2525 (connections 7)" in out
    assert f"1. authfile {users}" in out
    result = run("--config", str(conf), "--check-config", "--hostname", "flag.test", "-C", "3")
    out = result.stdout.decode()
    assert "hostname: flag.test" in out and "(connections 3)" in out


def test_auth_flags_keep_their_order(tmp_path, users):
    result = run("--check-config", "-a", str(users), "-A", "/bin/false", "--sendmail", CAPTURE)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr
    assert out.index("authfile") < out.index("checkpassword")
    assert "mechanisms: PLAIN LOGIN\n" in out  # checkpassword cannot give CRAM-MD5


def test_tmda_ofmipd_command_line_still_works(tmp_path, users):
    # Options only TMDA's tagging used are accepted and have no effect.
    capture = tmp_path / "cap"
    capture.mkdir()
    result = run(
        "-1",
        "-f",
        "-L",
        "-F",
        "-P",
        "-c",
        "/var/tmda",
        "-a",
        str(users),
        "-t",
        "/bin/true",
        stdin=b"QUIT\r\n",
        env=server_env(CAPTURE_DIR=str(capture), TMDA_SENDMAIL_PROGRAM=CAPTURE),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"220 ")
    assert b"221" in result.stdout


def test_version():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.startswith(b"ofmipd ")


def test_python_dash_m_and_daemon_on_free_port(users, tmp_path):
    port = free_port()
    from tests.ofmipd_server import Daemon

    daemon = Daemon(
        ["-p", f"127.0.0.1:{port}", "-a", str(users), "--sendmail", CAPTURE], port, tmp_path
    )
    assert daemon.stop() == 0
    assert "ready on" in daemon.log_text()


def test_one_session_on_unpollable_stdin_is_one_line(users):
    with open("/dev/null", "rb") as devnull:
        result = subprocess.run(
            ofmipd_command("-1", "-a", str(users), "--sendmail", CAPTURE),
            stdin=devnull,
            capture_output=True,
            timeout=30,
            env=server_env(),
        )
    one_line_exit_2(result, "stdin")


def test_toml_ratelimit_table_reaches_the_limiter(tmp_path, users):
    conf = tmp_path / "ofmipd.toml"
    conf.write_text(f"""
[ratelimit]
store = "memory"
max_failures = 3
base_backoff = 30

[delivery]
sendmail = "{CAPTURE}"

[[auth]]
kind = "authfile"
path = "{users}"
""")
    result = run("--config", str(conf), "--check-config")
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    assert "login rate limit: memory: 3 failures" in out and "lock for 30s" in out
