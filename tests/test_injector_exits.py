"""--injector-exits: the --sendmail program's exit status becomes the reply after DATA.

Real programs only: tests/progs/exit-sendmail ends as its recipient says (exit-NN@,
signal@, hang@, hostile@), and Postfix's own /usr/sbin/sendmail refuses through
authorized_submit_users in a private config directory. The expected replies are written
out here from issue 14's table, not read from ofmipd.delivery.
"""

from __future__ import annotations

import smtplib
import subprocess
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.ofmipd_server import PROGS, Daemon, authfile, ofmipd_command, server_env

PASSWORD = "pw-alice"
MESSAGE = b"Subject: exits\r\n\r\nbody\r\n"
EXIT_SENDMAIL = str(PROGS / "exit-sendmail")
POSTFIX_SENDMAIL = "/usr/sbin/sendmail"

TEMP = (451, "4.3.0")
# Issue 14, "sysexits follows Postfix's sys_exits.c".
SYSEXITS = {code: (554, "5.3.0") for code in range(64, 79)} | {
    75: TEMP,
    71: TEMP,
    67: (550, "5.1.1"),
    68: (550, "5.1.2"),
    65: (554, "5.6.0"),
    77: (550, "5.7.1"),
    73: (552, "5.2.0"),
}
PROFILES = {
    "sysexits": SYSEXITS,
    "qmail": {100: (554, "5.3.0"), 111: TEMP},
    "msmtp": SYSEXITS | {68: TEMP, 69: TEMP},
    "tempfail": {},
}
# Every listed code, and some that no profile lists (1, 2, 99, 112, 255).
STATUSES = (1, 2, *range(64, 79), 99, 100, 111, 112, 255)


def start(tmp_path: Path, *args: str, timeout: str = "0.5") -> Daemon:
    """A logging daemon whose deliveries time out after `timeout` seconds; one session may
    hear as many refusals as the tables have rows (--max-errors)."""
    users = authfile(tmp_path, f"alice:{PASSWORD}\n")
    port = free_port()
    return Daemon(
        ["-p", f"127.0.0.1:{port}", "--hostname", "mx.test", "-a", str(users), "-L",
         "--delivery-timeout", timeout, "--max-errors", "100", *args],
        port, tmp_path, env=server_env(),
    )  # fmt: skip


def send(s: smtplib.SMTP, rcpt: str) -> tuple[int, str, str]:
    """(code, enhanced code, whole reply text) after DATA for one message to `rcpt`."""
    try:
        s.sendmail("alice@example.org", [rcpt], MESSAGE)
    except smtplib.SMTPDataError as error:
        text = error.smtp_error.decode()
        return error.smtp_code, text.split()[0], text
    return 250, "2.0.0", ""


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_status_signal_and_timeout_get_the_profiles_reply(tmp_path, profile):
    daemon = start(tmp_path, "--sendmail", EXIT_SENDMAIL, "--injector-exits", profile)
    got, texts = {}, []
    try:
        with smtplib.SMTP(daemon.host, daemon.port, timeout=20) as s:
            s.login("alice", PASSWORD)
            for rcpt in [f"exit-{n}@example.net" for n in (0, *STATUSES)] + [
                "signal@example.net",
                "hang@example.net",
            ]:
                code, enhanced, text = send(s, rcpt)
                got[rcpt.split("@")[0]] = (code, enhanced)
                texts.append(text)
    finally:
        daemon.stop()
    table = PROFILES[profile]
    expected = {f"exit-{n}": table.get(n, TEMP) for n in STATUSES}
    # Nothing lost: 250 on exit 0 only; a signal or a timeout is never a 5xx.
    expected |= {"exit-0": (250, "2.0.0"), "signal": TEMP, "hang": TEMP}
    assert got == expected
    # The injector's stderr reaches the log line for that message, never the client.
    assert not any("injector exits" in text for text in texts)
    log = daemon.log_text()
    assert "injector" in log and "exit 67; message not accepted" in log
    assert "stderr: injector exits 67" in log
    assert "killed by SIGTERM" in log and "timed out after 0.5s" in log
    assert "accepted it; stderr: injector exits 0" in log


def test_hostile_stderr_is_bounded_escaped_and_kept_from_the_client(tmp_path):
    daemon = start(tmp_path, "--sendmail", EXIT_SENDMAIL)
    try:
        with smtplib.SMTP(daemon.host, daemon.port, timeout=20) as s:
            s.login("alice", PASSWORD)
            code, enhanced, text = send(s, "hostile@example.net")
    finally:
        daemon.stop()
    # 550 5.1.1 (exit 67), not 451: the 1 MB was drained, the program did not block.
    assert (code, enhanced) == (550, "5.1.1")
    assert "first" not in text and "250 ok" not in text and "red" not in text
    log = daemon.log_text()
    [line] = [x for x in log.splitlines() if "injector" in x]
    assert line.endswith(
        "stderr: first\\x0dfake: 250 ok | second \\x1b[31mred\\x1b[0m | third ..."
    ), line
    assert "\x1b" not in log and "\r" not in log and "fourth" not in log
    assert len(log) < 8192  # a megabyte went to the pipe; a line reached the log


def postfix_refusing_everyone(tmp_path: Path) -> Path:
    """A private Postfix config_directory whose authorized_submit_users is empty."""
    etc = tmp_path / "postfix"
    (etc / "spool").mkdir(parents=True)
    (etc / "main.cf").write_text(
        f"compatibility_level = 3.6\n"
        f"queue_directory = {etc}/spool\n"
        f"data_directory = {etc}/data\n"
        "myhostname = postfix.test\n"
        "authorized_submit_users =\n"  # empty: nobody, root included, may submit
    )
    return etc


@pytest.mark.slow  # Postfix's sendmail takes about 2 s to die of a fatal error
def test_postfix_sendmail_refusal_exit_status(tmp_path):
    """What Postfix's sendmail really exits with when authorized_submit_users says no:
    75, not the EX_NOPERM its source names, because its fatal-error handler exits
    EX_TEMPFAIL first. The profile must therefore answer 451 for it."""
    etc = postfix_refusing_everyone(tmp_path)
    result = subprocess.run(
        [POSTFIX_SENDMAIL, "-C", str(etc), "-f", "alice@example.org", "-i", "--", "x@example.net"],
        input=MESSAGE, capture_output=True, timeout=30,
    )  # fmt: skip
    assert b"is not allowed to submit mail" in result.stderr
    assert result.returncode == 75


@pytest.mark.slow
def test_postfix_sendmail_refusing_the_submitter_gives_451_and_logs_why(tmp_path):
    etc = postfix_refusing_everyone(tmp_path)
    daemon = start(tmp_path, "--sendmail", f"{POSTFIX_SENDMAIL} -C {etc}", timeout="30")
    try:
        with smtplib.SMTP(daemon.host, daemon.port, timeout=20) as s:
            s.login("alice", PASSWORD)
            code, enhanced, text = send(s, "x@example.net")
    finally:
        daemon.stop()
    assert (code, enhanced) == TEMP
    assert "allowed" not in text
    log = daemon.log_text()
    assert f"injector {POSTFIX_SENDMAIL} exit 75; message not accepted, replied 451 4.3.0" in log
    assert "stderr: sendmail: fatal: User root(0) is not allowed to submit mail" in log


class Refuser:
    """An SMTP server for msmtp to talk to: RCPT perm@ gets 550, temp@ gets 450, DATA to
    refuse-data@ gets 554; everything else is accepted."""

    async def handle_RCPT(self, server, session, envelope, address, options):
        if address.startswith("perm@"):
            return "550 5.1.1 no such user"
        if address.startswith("temp@"):
            return "450 4.2.0 try later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if any(r.startswith("refuse-data@") for r in envelope.rcpt_tos):
            return "554 5.6.0 content refused"
        return "250 OK"


# What msmtp exits with for each refusal (65, 69, 69), and the reply that gives.
MSMTP_REPLIES = {
    "msmtp": {"perm": (554, "5.6.0"), "temp": TEMP, "refuse-data": TEMP, "ok": (250, "2.0.0")},
    "sysexits": {
        "perm": (554, "5.6.0"),
        "temp": (554, "5.3.0"),  # why msmtp has its own profile: its 69 can be a 4xx
        "refuse-data": (554, "5.3.0"),
        "ok": (250, "2.0.0"),
    },
}


@pytest.mark.parametrize("profile", sorted(MSMTP_REPLIES))
def test_msmtp_refusals_through_the_msmtp_profile(tmp_path, profile):
    from aiosmtpd.controller import Controller

    downstream = Controller(Refuser(), hostname="127.0.0.1", port=free_port())
    downstream.start()
    msmtp = f"/usr/bin/msmtp --host=127.0.0.1 --port={downstream.port}"
    daemon = start(tmp_path, "--sendmail", msmtp, "--injector-exits", profile, timeout="20")
    try:
        with smtplib.SMTP(daemon.host, daemon.port, timeout=30) as s:
            s.login("alice", PASSWORD)
            got = {r: send(s, f"{r}@example.net")[:2] for r in MSMTP_REPLIES[profile]}
    finally:
        daemon.stop()
        downstream.stop()
    assert got == MSMTP_REPLIES[profile]
    log = daemon.log_text()
    assert "exit 65;" in log and "exit 69;" in log
    assert "stderr: msmtp: recipient address temp@example.net not accepted by the server" in log


def test_msmtp_that_cannot_resolve_its_server_is_temporary(tmp_path):
    """msmtp exits 68 when its own server's name does not resolve: the message is fine."""
    msmtp = "/usr/bin/msmtp --host=no-such-host.invalid --port=25"
    daemon = start(tmp_path, "--sendmail", msmtp, "--injector-exits", "msmtp", timeout="20")
    try:
        with smtplib.SMTP(daemon.host, daemon.port, timeout=30) as s:
            s.login("alice", PASSWORD)
            assert send(s, "bob@example.net")[:2] == TEMP
    finally:
        daemon.stop()
    assert "exit 68;" in daemon.log_text()
    assert "cannot locate host no-such-host.invalid" in daemon.log_text()


def check_config(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ofmipd_command("--check-config", *args), capture_output=True, timeout=30, env=server_env()
    )


def test_check_config_names_the_profile_from_flag_and_toml(tmp_path):
    users = authfile(tmp_path, f"alice:{PASSWORD}\n")
    result = check_config("-a", str(users), "--sendmail", EXIT_SENDMAIL)
    assert f"delivery: sendmail {EXIT_SENDMAIL} (exit statuses: sysexits)" in result.stdout.decode()
    conf = tmp_path / "ofmipd.toml"
    conf.write_text(
        f'[delivery]\nsendmail = "{EXIT_SENDMAIL}"\ninjector_exits = "qmail"\n'
        f'[[auth]]\nkind = "authfile"\npath = "{users}"\n'
    )
    result = check_config("--config", str(conf))
    assert result.returncode == 0, result.stderr
    assert "(exit statuses: qmail)" in result.stdout.decode()
    result = check_config("--config", str(conf), "--injector-exits", "msmtp")
    assert "(exit statuses: msmtp)" in result.stdout.decode()


@pytest.mark.parametrize("where", ["flag", "toml"])
def test_unknown_profile_is_one_line_exit_2(tmp_path, where):
    users = authfile(tmp_path, f"alice:{PASSWORD}\n")
    if where == "flag":
        result = check_config("-a", str(users), "--injector-exits", "postfix")
    else:
        conf = tmp_path / "ofmipd.toml"
        conf.write_text(f'[delivery]\ninjector_exits = "postfix"\n[[auth]]\nkind = "authfile"\n'
                        f'path = "{users}"\n')  # fmt: skip
        result = check_config("--config", str(conf))
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and "postfix" in err, err
    assert "sysexits" in err and "tempfail" in err, err  # the choices are named
    assert "Traceback" not in err


@pytest.mark.parametrize("other", ["--maildir", "--relay"])
def test_a_profile_with_maildir_or_relay_is_one_line_exit_2(tmp_path, other):
    users = authfile(tmp_path, f"alice:{PASSWORD}\n")
    value = str(tmp_path / "Maildir") if other == "--maildir" else "smtp://127.0.0.1:1"
    result = check_config("-a", str(users), other, value, "--injector-exits", "qmail")
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert err.strip() == f"ofmipd: --injector-exits applies to --sendmail, not to {other}"
