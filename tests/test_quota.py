"""--quota against real ofmipd processes and real stores: checked at MAIL (450 4.7.1) and
RCPT (452 4.5.3), charged only after the final 250, released when a transaction ends
otherwise, shared by --workers, by one-session processes (SQLite) and by daemons on
"several hosts" (Redis); the log line, the metric, ofmipd-authtest --quota, --check-config
and the configuration errors."""

from __future__ import annotations

import asyncio
import base64
import smtplib
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO

import pytest

from ofmipd.errors import ConfigError
from ofmipd.quota import Holds, Quota, Quotas, parse_quota, quota_from_table
from ofmipd.store import MemoryStore
from tests.conftest import free_port
from tests.ofmipd_server import (
    CAPTURE,
    PROGS,
    ROOT,
    Daemon,
    authfile,
    ofmipd_command,
    private_state_dir,
    server_env,
)
from tests.redis_server import RedisServer, redis_server  # noqa: F401 (a fixture)

EXIT_SENDMAIL = str(PROGS / "exit-sendmail")
PYTHON = ofmipd_command()[0]


def users(tmp_path: Path) -> Path:
    return authfile(tmp_path, "alice:secret\nbob:secret\n")


def daemon(tmp_path: Path, *args: str, state: str | None = None, sendmail: str = CAPTURE) -> Daemon:
    port = free_port()
    capture = tmp_path / "capture"
    capture.mkdir(exist_ok=True)
    env = server_env(CAPTURE_DIR=str(capture), **({"STATE_DIRECTORY": state} if state else {}))
    return Daemon(
        ["-p", f"127.0.0.1:{port}", "--hostname", "mx.test", "-a", str(users(tmp_path)),
         "--sendmail", sendmail, "-L", *args],
        port, tmp_path, env=env,
    )  # fmt: skip


def login(server: Daemon, user: str = "alice") -> smtplib.SMTP:
    smtp = smtplib.SMTP(server.host, server.port, local_hostname="client.example", timeout=30)
    smtp.login(user, "secret")
    return smtp


def send(smtp: smtplib.SMTP, *rcpts: str) -> tuple[int, bytes]:
    """One transaction; the first refused step's reply, else DATA's."""
    code, reply = smtp.mail("alice@example.com")
    if code != 250:
        return code, reply
    for rcpt in rcpts:
        code, reply = smtp.rcpt(rcpt)
        if code != 250:
            smtp.rset()
            return code, reply
    return smtp.data(b"Subject: q\r\n\r\nbody\r\n")


def mail_code(smtp: smtplib.SMTP) -> tuple[int, bytes]:
    return smtp.mail("alice@example.com")


# ---- parsing and configuration ------------------------------------------------------------


def test_a_flag_and_a_toml_table_give_the_same_quota() -> None:
    table = {"kind": "user-recipients", "limit": 1000, "window": "1d"}
    assert parse_quota("user-recipients:1000/1d") == quota_from_table(table)
    assert parse_quota("ip-messages:5/30s") == Quota("ip-messages", 5, 30.0)
    assert str(parse_quota("user-messages:200/60m")) == "user-messages:200/1h"
    assert quota_from_table({"kind": "ip-recipients", "limit": 3, "window": 600}).window == 600


@pytest.mark.parametrize(
    "text",
    ["user-messages:0/1h", "users-messages:5/1h", "user-messages:5/1y", "user-messages:5",
     "user-messages:-1/1h", "user-messages:5/0s", "user-messages:five/1h", ""],
)  # fmt: skip
def test_bad_quota_values_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_quota(text)


def run_ofmipd(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ofmipd_command("-a", str(users(tmp_path)), "--sendmail", CAPTURE, *args, "--check-config"),
        capture_output=True,
        text=True,
        env=server_env(),
        timeout=60,
    )


@pytest.mark.parametrize(
    "args",
    [["--quota", "user-messages:0/1h"], ["--quota", "bogus:1/1h"],
     ["--quota", "ip-recipients:10/soon"], ["--quota-reply", "maybe"]],
)  # fmt: skip
def test_a_bad_quota_flag_is_one_line_and_exit_2(tmp_path: Path, args: list[str]) -> None:
    done = run_ofmipd(tmp_path, *args)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("table", "words"),
    [('kind = "user-messages"\nlimit = 5\n', "window is required"),
     ('kind = "user-messages"\nlimit = 5\nwindow = "1h"\nburst = 2\n', "unknown setting 'burst'"),
     ('kind = "user-messages"\nlimit = true\nwindow = "1h"\n', "positive integer")],
)  # fmt: skip
def test_a_bad_quota_table_is_one_line_and_exit_2(tmp_path: Path, table: str, words: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(f"[[quota]]\n{table}")
    done = run_ofmipd(tmp_path, "--config", str(config))
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and words in done.stderr


def test_check_config_lists_the_quotas_and_the_store(tmp_path: Path) -> None:
    config = tmp_path / "q.toml"
    config.write_text('[[quota]]\nkind = "ip-recipients"\nlimit = 1000\nwindow = "1d"\n')
    done = run_ofmipd(
        tmp_path, "--config", str(config), "--quota", "user-messages:200/1h",
        "--quota-reply", "permanent",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("quotas: sqlite "))
    assert "over quota permanent (550 5.7.1)" in lines[at] and "fail open" in lines[at]
    assert lines[at + 1 : at + 2] == ["  user-messages:200/1h"]  # the flag replaces the file's
    assert "quotas: none" in run_ofmipd(tmp_path).stdout


# ---- one store, in process: the keys --------------------------------------------------------


def test_user_names_differing_in_case_or_unicode_form_share_one_budget() -> None:
    asyncio.run(same_budget_for_case_and_unicode_forms())


async def same_budget_for_case_and_unicode_forms() -> None:
    quotas = Quotas((Quota("user-messages", 2, 3600.0),), MemoryStore())
    for name in ("alice", "ALICE"):
        holds = Holds()
        assert await quotas.check(holds, "messages", name, None, "s") is None
        holds.accepted = True
        quotas.end(holds)
    await quotas.drain()
    refusal = await quotas.check(Holds(), "messages", "ａｌｉｃｅ", None, "s")  # fullwidth
    assert refusal is not None and refusal.reply.startswith("450 4.7.1")
    assert await quotas.check(Holds(), "messages", "bob", None, "s") is None


def test_an_ipv6_client_is_counted_by_its_64() -> None:
    asyncio.run(ipv6_by_64())


async def ipv6_by_64() -> None:
    quotas = Quotas((Quota("ip-messages", 1, 3600.0),), MemoryStore())
    holds = Holds()
    assert await quotas.check(holds, "messages", None, "2001:db8:1:2::1", "s") is None
    refusal = await quotas.check(Holds(), "messages", None, "2001:db8:1:2:ffff::9", "s")
    assert refusal is not None and refusal.kind == "ip-messages"
    assert await quotas.check(Holds(), "messages", None, "2001:db8:1:3::1", "s") is None


# ---- a real daemon and the SQLite store ----------------------------------------------------


def test_message_quota_refuses_at_mail_logs_and_spares_other_logins(tmp_path: Path) -> None:
    with daemon(tmp_path, "--quota", "user-messages:2/1h") as server:
        smtp = login(server)
        assert send(smtp, "x@example.org")[0] == 250
        assert send(smtp, "y@example.org")[0] == 250
        code, reply = mail_code(smtp)
        assert (code, reply[:5]) == (450, b"4.7.1")
        assert b"user-messages:2/1h" in reply
        smtp.quit()
        other = login(server, "bob")
        assert send(other, "z@example.org")[0] == 250  # bob has a budget of his own
        other.quit()
        server.wait_for_log("over quota")
        lines = [line for line in server.log_text().splitlines() if "over quota" in line]
    assert len(lines) == 1  # one line per event
    assert "user-messages:2/1h user=alice client=127.0.0.1 resets=20" in lines[0]


def test_permanent_replies_are_550(tmp_path: Path) -> None:
    args = ("--quota", "user-messages:1/1h", "--quota", "user-recipients:1/1h")
    with daemon(tmp_path, *args, "--quota-reply", "permanent") as server:
        smtp = login(server)
        assert smtp.mail("alice@example.com")[0] == 250
        assert smtp.rcpt("a@example.org")[0] == 250
        code, reply = smtp.rcpt("b@example.org")
        assert (code, reply[:5]) == (550, b"5.7.1")
        assert smtp.data(b"Subject: q\r\n\r\nbody\r\n")[0] == 250
        code, reply = mail_code(smtp)
        assert (code, reply[:5]) == (550, b"5.7.1")
        smtp.quit()


def test_recipients_are_counted_at_rcpt_and_each_accepted_one_is_charged(tmp_path: Path) -> None:
    with daemon(tmp_path, "--quota", "user-recipients:4/1h") as server:
        smtp = login(server)
        assert smtp.mail("alice@example.com")[0] == 250
        for rcpt in ("a@example.org", "b@example.org", "c@example.org"):
            assert smtp.rcpt(rcpt)[0] == 250
        assert smtp.data(b"Subject: three\r\n\r\nbody\r\n")[0] == 250  # charges 3
        assert smtp.mail("alice@example.com")[0] == 250
        assert smtp.rcpt("d@example.org")[0] == 250  # the fourth
        code, reply = smtp.rcpt("e@example.org")
        assert (code, reply[:5]) == (452, b"4.5.3")
        assert smtp.data(b"Subject: one\r\n\r\nbody\r\n")[0] == 250  # with the one accepted
        smtp.quit()


def test_rset_a_failed_delivery_and_a_disconnect_use_no_quota(tmp_path: Path) -> None:
    args = ("--quota", "user-messages:1/1h", "--quota", "user-recipients:1/1h")
    with daemon(tmp_path, *args, sendmail=EXIT_SENDMAIL) as server:
        smtp = login(server)
        assert smtp.mail("alice@example.com")[0] == 250
        smtp.rset()
        code, reply = send(smtp, "exit-75@example.org")  # the injector: temporary failure
        assert code == 451, reply
        code, reply = send(smtp, "exit-65@example.org")  # the injector: permanent failure
        assert code == 554, reply
        held = login(server)
        assert held.mail("alice@example.com")[0] == 250  # holds the only message
        assert mail_code(smtp)[0] == 450  # while it is held
        held.sock.shutdown(socket.SHUT_RDWR)  # gone without QUIT
        held.close()
        deadline = time.monotonic() + 10
        while (code := mail_code(smtp)[0]) != 250 and time.monotonic() < deadline:
            time.sleep(0.2)  # the server notices the disconnect at once; a few tries at most
        assert code == 250
        assert smtp.rcpt("ok@example.org")[0] == 250
        assert smtp.data(b"Subject: q\r\n\r\nbody\r\n")[0] == 250
        assert mail_code(smtp)[0] == 450  # that one was charged
        smtp.quit()


def test_a_relay_client_is_counted_by_address_only(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.write_text("127.0.0.1 relay\n")
    args = ("--rules", str(rules), "--quota", "user-messages:2/1h", "--quota", "ip-messages:3/1h")
    with daemon(tmp_path, *args) as server:
        smtp = smtplib.SMTP(server.host, server.port, local_hostname="c.example", timeout=30)
        smtp.ehlo()
        assert send(smtp, "a@example.org")[0] == 250
        assert send(smtp, "b@example.org")[0] == 250  # no login: user-messages does not apply
        authed = login(server)
        assert send(authed, "c@example.org")[0] == 250  # the address's third
        code, reply = mail_code(authed)
        assert code == 450 and b"ip-messages:3/1h" in reply
        authed.quit()
        smtp.quit()


def concurrent_mail(server: Daemon, sessions: int) -> tuple[list[smtplib.SMTP], list[int]]:
    """`sessions` logged-in clients say MAIL at the same moment; their replies."""
    clients = [login(server) for _ in range(sessions)]
    start = threading.Barrier(sessions)
    codes = [0] * sessions

    def go(number: int) -> None:
        start.wait()
        codes[number] = mail_code(clients[number])[0]

    threads = [threading.Thread(target=go, args=(n,)) for n in range(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return clients, codes


def test_concurrent_sessions_of_one_user_across_workers_never_exceed_the_budget(
    tmp_path: Path,
) -> None:
    with daemon(tmp_path, "--workers", "2", "--quota", "user-messages:2/1h") as server:
        clients, codes = concurrent_mail(server, 6)
        assert sorted(codes) == [250, 250, 450, 450, 450, 450]
        for client, code in zip(clients, codes, strict=True):
            if code == 250:
                assert client.rcpt("x@example.org")[0] == 250
                assert client.data(b"Subject: q\r\n\r\nbody\r\n")[0] == 250
        for client in clients:
            client.quit()
        late = login(server)
        assert mail_code(late)[0] == 450  # both charged, in the store both workers share
        late.quit()
        server.wait_for_log("resets=20")
        lines = [line for line in server.log_text().splitlines() if "over quota" in line]
    # Refused while the two were in progress, then once the budget was spent.
    assert sum("resets=- in_progress=yes" in line for line in lines) == 4
    assert sum("resets=20" in line for line in lines) == 1


class OneSession:
    """`ofmipd -1` on pipes, spoken to line by line."""

    def __init__(self, tmp_path: Path, state: str, *args: str) -> None:
        capture = tmp_path / "capture"
        capture.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            ofmipd_command("-1", "--hostname", "mx.test", "-a", str(users(tmp_path)),
                           "--sendmail", CAPTURE, *args),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=server_env(CAPTURE_DIR=str(capture), STATE_DIRECTORY=state),
        )  # fmt: skip
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin: IO[bytes] = self.proc.stdin
        self.stdout: IO[bytes] = self.proc.stdout
        assert self.reply().startswith("220")
        assert self.command("EHLO client.example").startswith("250")
        token = base64.b64encode(b"\0alice\0secret").decode()
        assert self.command(f"AUTH PLAIN {token}").startswith("235")

    def reply(self) -> str:
        lines = []
        while True:
            line = self.stdout.readline().decode()
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return "".join(lines)

    def command(self, line: str) -> str:
        self.stdin.write(line.encode() + b"\r\n")
        self.stdin.flush()
        return self.reply()

    def message(self) -> str:
        assert self.command("RCPT TO:<x@example.org>").startswith("250")
        assert self.command("DATA").startswith("354")
        return self.command("Subject: q\r\n\r\nbody\r\n.")

    def quit(self) -> int:
        self.command("QUIT")
        return self.proc.wait(30)


def test_one_session_processes_share_the_budget_through_sqlite(tmp_path: Path) -> None:
    state = private_state_dir()
    first, second = (OneSession(tmp_path, state, "--quota", "user-messages:1/1h") for _ in "12")
    assert first.command("MAIL FROM:<alice@example.com>").startswith("250")
    assert second.command("MAIL FROM:<alice@example.com>").startswith("450 4.7.1")  # held
    assert first.message().startswith("250")
    assert first.quit() == 0  # the charge is in the store before the process ends
    assert second.command("MAIL FROM:<alice@example.com>").startswith("450 4.7.1")
    assert second.quit() == 0
    third = OneSession(tmp_path, state, "--quota", "user-messages:1/1h")
    assert third.command("MAIL FROM:<alice@example.com>").startswith("450 4.7.1")
    third.quit()


def test_authtest_prints_usage_and_reset_from_the_servers_store(tmp_path: Path) -> None:
    state = private_state_dir()
    config = tmp_path / "ofmipd.toml"
    config.write_text(
        f'state_dir = "{state}"\n[[auth]]\nkind = "authfile"\npath = "{users(tmp_path)}"\n'
        '[[quota]]\nkind = "user-messages"\nlimit = 3\nwindow = "1h"\n'
        '[[quota]]\nkind = "user-recipients"\nlimit = 10\nwindow = "1d"\n'
        '[[quota]]\nkind = "ip-messages"\nlimit = 50\nwindow = "1h"\n'
    )
    config.chmod(0o600)
    with daemon(tmp_path, "--config", str(config)) as server:
        smtp = login(server)
        assert send(smtp, "a@example.org", "b@example.org")[0] == 250
        smtp.quit()

    def authtest(user: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PYTHON, "-m", "ofmipd.authtest", "--config", str(config), "--quota", user],
            capture_output=True, text=True, env=server_env(), timeout=60, cwd=ROOT,
        )  # fmt: skip

    done = authtest("ALICE")  # the same budget as alice
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("quotas for ALICE (sqlite ")
    assert lines[1].startswith("  user-messages:3/1h: 1 used, 2 left, resets in 3")
    assert lines[2].startswith("  user-recipients:10/1d: 2 used, 8 left, resets in 8")
    assert len(lines) == 3  # ip quotas are not a user's
    fresh = authtest("bob").stdout.splitlines()
    assert fresh[1] == "  user-messages:3/1h: 0 used, 3 left, no window open"


def test_metrics_count_over_quota_events_by_kind(tmp_path: Path) -> None:
    port = free_port()
    args = ("--quota", "user-messages:1/1h", "--quota", "user-recipients:1/1h")
    with daemon(tmp_path, *args, "--metrics", f"127.0.0.1:{port}") as server:
        smtp = login(server)
        assert smtp.mail("alice@example.com")[0] == 250
        assert smtp.rcpt("a@example.org")[0] == 250
        assert smtp.rcpt("b@example.org")[0] == 452
        assert smtp.data(b"Subject: q\r\n\r\nbody\r\n")[0] == 250
        assert mail_code(smtp)[0] == 450
        assert mail_code(smtp)[0] == 450
        smtp.quit()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as page:
            text = page.read().decode()
    assert 'ofmipd_quota_exceeded_total{quota="user-messages"} 2.0' in text
    assert 'ofmipd_quota_exceeded_total{quota="user-recipients"} 1.0' in text


# ---- Redis: several hosts, and an outage ------------------------------------------------------


def test_two_daemons_share_the_budget_through_redis(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    args = ("--ratelimit", redis_server.url, "--quota", "user-messages:1/1h")
    with daemon(tmp_path, *args) as one, daemon(tmp_path, *args) as two:
        smtp = login(one)
        assert send(smtp, "a@example.org")[0] == 250
        smtp.quit()
        other = login(two)
        code, reply = mail_code(other)
        assert (code, reply[:5]) == (450, b"4.7.1")
        other.quit()


def test_a_store_outage_fails_open_to_process_memory_as_the_guessing_limits_do(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    args = ("--ratelimit", redis_server.url, "--quota", "user-messages:1/1h")
    with daemon(tmp_path, *args) as server:
        smtp = login(server)
        redis_server.stop()
        assert send(smtp, "a@example.org")[0] == 250  # counted in this process's memory
        assert mail_code(smtp)[0] == 450
        smtp.quit()
        assert "failing open: quotas are counted in this process's memory" in server.log_text()


def test_a_store_outage_fails_closed_with_451_when_configured(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    args = ("--ratelimit", redis_server.url, "--ratelimit-fail-closed")
    with daemon(tmp_path, *args, "--quota", "user-messages:5/1h") as server:
        smtp = login(server)
        redis_server.stop()
        code, reply = mail_code(smtp)
        assert (code, reply[:5]) == (451, b"4.3.0")
        smtp.quit()
