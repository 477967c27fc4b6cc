"""conf/fail2ban: the real fail2ban-regex bans only the right addresses from ofmipd's own lines."""

from __future__ import annotations

import base64
import io
import logging
import re
import shutil
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from ofmipd import logs
from ofmipd.ratelimit import LoginLimiter
from tests.ofmipd_server import start_daemon

CONF = ROOT / "conf" / "fail2ban"
AUTH_LINE = "auth %s: client=%s user=%s mechanism=%s backend=%s reason=%r ms=%.1f session=%s"
REFUSED_LINE = "auth refused: client=%s user=%s reason=%r session=%s"


@pytest.fixture
def f2b_conf(tmp_path: Path) -> Path:
    """/etc/fail2ban (for common.conf, paths, actions) plus ofmipd's filter and jail."""
    conf = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", conf)
    shutil.copy(CONF / "filter.d" / "ofmipd.conf", conf / "filter.d" / "ofmipd.conf")
    shutil.copy(CONF / "jail.d" / "ofmipd.local", conf / "jail.d" / "ofmipd.local")
    return conf


def stderr_lines(events: list[tuple[int, str, tuple[object, ...]]]) -> list[str]:
    """The lines ofmipd's real stderr log set-up writes for these events."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, sys.stderr)
    buffer = io.StringIO()
    sys.stderr = buffer  # logs.setup() binds its StreamHandler to sys.stderr
    try:
        logs.setup(debug=False, syslog=False)
        for level, fmt, args in events:
            logging.getLogger("ofmipd.auth").log(level, fmt, *args)
    finally:
        sys.stderr = saved[2]
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
    return buffer.getvalue().splitlines()


def syslog_line(fmt: str, *args: object, time: str = "Nov 25 14:16:10") -> str:
    # What rsyslog writes for ofmipd's SysLogHandler format "ofmipd[PID]: %(message)s".
    return f"{time} mail ofmipd[4242]: " + fmt % args


def fail2ban_regex(log: Path, conf: Path) -> list[str]:
    result = subprocess.run(
        ["fail2ban-regex", "--out", "ip", str(log), str(conf / "filter.d" / "ofmipd.conf")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_filter_bans_rejects_and_ip_lockouts_only(f2b_conf: Path, tmp_path: Path) -> None:
    W, I = logging.WARNING, logging.INFO  # noqa: E741
    ip_refusal = LoginLimiter._refusal("ip", "192.0.2.7", 120).reason
    user_refusal = LoginLimiter._refusal("user", "192.0.2.40", 120).reason
    evil = "x client=10.9.9.9 user=y"
    lines = stderr_lines(
        [
            (W, AUTH_LINE, ("reject", "192.0.2.7", "alice", "PLAIN", "authfile",
                            "password mismatch for alice in /etc/ofmipd/users", 0.4, "ab12f")),
            # an attacker's user name that tries to put someone else's address in the line
            (W, AUTH_LINE, ("reject", "192.0.2.8", evil, "LOGIN", "authfile",
                            f"no such user {evil} in /etc/ofmipd/users", 0.3, "ab130")),
            (W, AUTH_LINE, ("reject", "192.0.2.8", "a=b c d", "PLAIN", "authfile",
                            "malformed credentials", 0.1, "ab131")),
            # never: an accepted login whose user name looks like a reject line
            (I, AUTH_LINE, ("accept", "192.0.2.20", "u auth reject: client=10.9.9.9 user=v",
                            "PLAIN", "authfile", "password matches", 0.2, "ab132")),
            # never: outages are not attacks
            (W, AUTH_LINE, ("tempfail", "192.0.2.30", "alice", "PLAIN", "ldap",
                            "LDAP SERVER_DOWN", 5000.0, "ab133")),
            (W, REFUSED_LINE, ("192.0.2.7", "alice", ip_refusal, "ab134")),
            # never: the owner of a locked user name is not the attacker
            (W, REFUSED_LINE, ("192.0.2.40", "alice", user_refusal, "ab135")),
            (W, REFUSED_LINE, ("192.0.2.41", "bob",
                               "rate limiter store unavailable, failing closed", "ab136")),
            # never: no address to ban (and no DNS lookup of "unknown")
            (W, AUTH_LINE, ("reject", "unknown", "alice", "PLAIN", "authfile", "x", 0.1, "ab137")),
        ]
    )  # fmt: skip
    assert len(lines) == 9 and lines[0].split(" ", 2)[2].startswith("ofmipd[")
    lines += [
        syslog_line(AUTH_LINE, "reject", "2001:db8::7", "bob", "LOGIN", "pam",
                    "PAM authentication failure", 3.1, "cd01"),
        syslog_line(AUTH_LINE, "reject", "198.51.100.3", "carol client=10.9.9.9", "PLAIN",
                    "pam", "PAM authentication failure", 3.1, "cd02"),
        syslog_line(AUTH_LINE, "tempfail", "198.51.100.4", "carol", "PLAIN", "pam",
                    "offload queue too old", 30000.0, "cd03"),
        syslog_line(AUTH_LINE, "accept", "198.51.100.5", "carol", "PLAIN", "pam",
                    "password matches", 3.1, "cd04"),
        syslog_line(REFUSED_LINE, "198.51.100.6", "dave", user_refusal, "cd05"),
        # stderr captured by journald, as fail2ban's file view of it shows
        syslog_line("%s", lines[0].replace("192.0.2.7", "203.0.113.9")),
    ]  # fmt: skip
    assert "10.9.9.9" in lines[1] and "10.9.9.9" in lines[10]
    log = tmp_path / "ofmipd.log"
    log.write_text("\n".join(lines) + "\n")

    banned = fail2ban_regex(log, f2b_conf)

    assert banned == [
        "192.0.2.7",
        "192.0.2.8",
        "192.0.2.8",
        "192.0.2.7",
        "2001:db8::7",
        "198.51.100.3",
        "203.0.113.9",
    ]
    assert "10.9.9.9" not in banned


def test_filter_counts_every_matching_line(f2b_conf: Path, tmp_path: Path) -> None:
    # The summary's counts, as an admin running fail2ban-regex by hand sees them.
    log = tmp_path / "ofmipd.log"
    log.write_text(
        "\n".join(
            syslog_line(AUTH_LINE, verdict, f"192.0.2.{n}", "u", "PLAIN", "b", "r", 1.0, "s")
            for n, verdict in enumerate(["reject"] * 4 + ["tempfail"] * 3 + ["accept"] * 2)
        )
        + "\n"
    )
    result = subprocess.run(
        ["fail2ban-regex", str(log), str(f2b_conf / "filter.d" / "ofmipd.conf")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Lines: 9 lines, 0 ignored, 4 matched, 5 missed" in result.stdout


def test_jail_loads_with_the_filter(f2b_conf: Path, tmp_path: Path) -> None:
    log = tmp_path / "mail.log"
    log.write_text("")
    (f2b_conf / "jail.d" / "zz-test.local").write_text(f"[ofmipd]\nlogpath = {log}\n")
    result = subprocess.run(
        ["fail2ban-client", "-c", str(f2b_conf), "-d"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    dump = result.stdout
    assert "['add', 'ofmipd', 'auto']" in dump
    assert f"['set', 'ofmipd', 'addlogpath', '{log}', 'head']" in dump
    assert "['set', 'ofmipd', 'usedns', 'no']" in dump
    assert "['set', 'ofmipd', 'maxretry', 10]" in dump
    assert "^reject: client=<ADDR> user=" in dump
    assert "['set', 'ofmipd', 'addjournalmatch', '_SYSTEMD_UNIT=ofmipd.service']" in dump
    assert "['start', 'ofmipd']" in dump


# What a client puts after a line break to fake a whole line of ofmipd's stderr log.
SEPARATORS = ("\n", "\r", "\r\n", "\x85", "\u2028")


def forged(separator: str) -> str:
    now = time.strftime("%Y-%m-%d %H:%M:%S")
    return (
        f"x{separator}{now},000 ofmipd[4242]: WARNING auth reject: client=203.0.113.9 user=x"
        " mechanism=PLAIN backend=authfile reason='x' ms=1.0 session=f0rge"
    )


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def replies(s: smtplib.SMTP, raw: bytes) -> list[int]:
    """Send raw bytes; read one reply per line sent."""
    s.send(raw)
    return [s.getreply()[0] for _ in range(raw.count(b"\n"))]


@pytest.mark.slow
def test_client_cannot_forge_a_fail2ban_line(f2b_conf: Path, tmp_path: Path, capture) -> None:
    users = tmp_path / "users"
    users.write_text("alice:alice-pw\n")
    users.chmod(0o600)
    senders = tmp_path / "senders"
    senders.write_text("alice alice@example.org\n")
    daemon = start_daemon(tmp_path, users, capture, "-d", "--ratelimit", "memory",
                          "--sender-map", str(senders))  # fmt: skip
    try:
        # EHLO, then (as alice, before any failure locks 127.0.0.1 out) MAIL FROM and RCPT TO.
        for separator in SEPARATORS:
            fake = forged(separator)
            quoted = f'"{fake}"@example.org'.encode()
            with smtplib.SMTP(daemon.host, daemon.port, timeout=20) as s:
                assert replies(s, b"EHLO " + fake.encode() + b"\r\n")
                s.ehlo("client.test")
                code, _ = s.docmd("AUTH", f"PLAIN {b64(chr(0) + 'alice' + chr(0) + 'alice-pw')}")
                assert code == 235
                replies(s, b"MAIL FROM:<" + quoted + b">\r\n")
                s.rset()
                replies(s, b"MAIL FROM:<alice@example.org>\r\n")
                replies(s, b"RCPT TO:<" + quoted + b">\r\n")
        # User names, by PLAIN and by LOGIN.
        for separator in SEPARATORS:
            fake = forged(separator)
            with smtplib.SMTP(daemon.host, daemon.port, timeout=20) as s:
                s.ehlo("client.test")
                code, _ = s.docmd("AUTH", f"PLAIN {b64(chr(0) + fake + chr(0) + 'pw')}")
                assert code in (535, 454)
                assert s.docmd("AUTH", "LOGIN")[0] == 334
                assert replies(s, f"{b64(fake)}\r\n".encode()) == [334]
                assert replies(s, f"{b64('pw')}\r\n".encode())[0] in (535, 454)
        with smtplib.SMTP(daemon.host, daemon.port, timeout=20) as s:
            s.ehlo("client.test")  # a real failure, now refused: the address is locked out
            assert s.docmd("AUTH", f"PLAIN {b64(chr(0) + 'alice' + chr(0) + 'wrong')}")[0] == 454
        time.sleep(0.3)
    finally:
        daemon.stop()
    banned = fail2ban_regex(daemon.log_path, f2b_conf)

    assert banned and set(banned) == {"127.0.0.1"}
    raw = daemon.log_path.read_bytes().decode("utf-8")
    assert "Traceback" not in raw
    lines = raw.split("\n")
    for line in lines:
        assert line.isprintable(), line  # no CR, NEL, U+2028 or other control in a line
    # Each forged-name attempt is one line for the real client: refused at the door, or
    # refused by the lock-out the earlier ones started.
    counted = re.compile(
        r"^\S+ \S+ ofmipd\[\d+\]: WARNING auth (reject|refused): client=127\.0\.0\.1 "
    )
    assert sum(bool(counted.match(line)) for line in lines) >= 2 * len(SEPARATORS)
