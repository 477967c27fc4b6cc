"""--relay against a real Postfix (tests/postfix_server.py): the transaction proxied,
the downstream's RCPT verdicts at RCPT time, the client's identity in Postfix's log, a
dead pooled connection replaced, and the configuration errors."""

from __future__ import annotations

import re
import shutil
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.ofmipd_server import Daemon, authfile, ofmipd_command, server_env, wait_for_port
from tests.postfix_server import Postfix, login, queue_id, relay_daemon, running_postfix

REFUSED = "nobody@example.org"


@pytest.fixture(scope="module")
def postfix() -> Iterator[Postfix]:
    yield from running_postfix(refused=(REFUSED,), smtps_port=free_port())


def message(subject: str) -> bytes:
    return f"From: alice@example.com\r\nSubject: {subject}\r\n\r\nbody\r\n".encode()


def test_message_goes_down_with_the_client_and_login_in_postfix_log(
    tmp_path: Path, postfix: Postfix
) -> None:
    with relay_daemon(tmp_path, postfix) as daemon:
        smtp = login(daemon)
        code, reply = smtp.mail("alice@example.com")
        assert code == 250 and b"2.1.0" in reply  # Postfix's "2.1.0 Ok", not ofmipd's own
        assert smtp.rcpt("bob@example.org")[0] == 250
        code, reply = smtp.data(message("one"))
        smtp.quit()
    assert code == 250
    qid = queue_id(reply)  # the client's 250 is Postfix's, after its queue file
    [smtpd] = postfix.wait_for_log(rf"{qid}: client=")
    assert "[127.0.0.1]" in smtpd
    assert "sasl_username=alice" in smtpd
    assert postfix.wait_for_log(rf"{qid}: to=<bob@example.org>.*status=sent")
    assert f"relay smtp://127.0.0.1:{postfix.port}: 250" in daemon.log_text()


def test_downstream_refuses_a_recipient_at_rcpt_time(tmp_path: Path, postfix: Postfix) -> None:
    with relay_daemon(tmp_path, postfix) as daemon:
        smtp = login(daemon)
        smtp.mail("alice@example.com")
        code, reply = smtp.rcpt(REFUSED)
        assert (code, reply[:5]) == (550, b"5.1.1")
        assert b"no such user here" in reply  # Postfix's text reaches the client
        assert smtp.rcpt("carol@example.org")[0] == 250
        code, reply = smtp.data(message("two"))
        smtp.quit()
    assert code == 250
    qid = queue_id(reply)
    assert postfix.wait_for_log(rf"{qid}: to=<carol@example.org>.*status=sent")
    assert not [line for line in postfix.maillog().splitlines() if REFUSED in line and qid in line]


def test_rset_leaves_nothing_downstream_and_each_transaction_has_its_identity(
    tmp_path: Path, postfix: Postfix
) -> None:
    # One pooled connection: the second transaction reuses the first's connection.
    with relay_daemon(tmp_path, postfix, "--relay-connections", "1") as daemon:
        smtp = login(daemon)
        smtp.mail("abandoned@example.com")
        smtp.rcpt("dave@example.org")
        smtp.rset()
        smtp.mail("alice@example.com")
        smtp.rcpt("erin@example.org")
        code, first = smtp.data(message("three"))
        assert code == 250
        smtp.mail("alice@example.com")
        smtp.rcpt("frank@example.org")
        code, second = smtp.data(message("four"))
        assert code == 250
        smtp.quit()
    for reply, rcpt in ((first, "erin"), (second, "frank")):
        qid = queue_id(reply)
        assert len(postfix.wait_for_log(rf"{qid}: to=<{rcpt}@example.org>.*status=sent")) == 1
        [smtpd] = postfix.wait_for_log(rf"{qid}: client=")
        assert "sasl_username=alice" in smtpd  # XCLIENT again on the reused connection
    assert "abandoned@" not in postfix.maillog()
    assert "dave@" not in postfix.maillog()
    assert daemon.log_text().count("queued as") == 2


def test_a_dead_pooled_connection_is_replaced_and_a_stopped_mta_is_a_4xx(
    tmp_path: Path, postfix: Postfix
) -> None:
    with relay_daemon(tmp_path, postfix) as daemon:
        smtp = login(daemon)
        assert smtp.sendmail("alice@example.com", ["gina@example.org"], message("5")) == {}
        smtp.quit()  # its downstream connection now waits in the pool
        postfix.stop()
        try:
            smtp = login(daemon)
            code, reply = smtp.mail("alice@example.com")
            assert code == 451 and reply.startswith(b"4.4.0")
            smtp.quit()
        finally:
            postfix.start()
        smtp = login(daemon)
        assert smtp.sendmail("alice@example.com", ["hana@example.org"], message("6")) == {}
        smtp.quit()
    assert postfix.wait_for_log(r"to=<hana@example.org>.*status=sent")


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--relay", "smtp://127.0.0.1:2525", "--sendmail", "/bin/true"],
         "--relay and --sendmail exclude each other"),
        (["--relay", "smtp://127.0.0.1:2525", "--maildir", "/tmp/x"],
         "--relay and --maildir exclude each other"),
        (["--relay", "lmtp://127.0.0.1"], "expected smtp://HOST[:PORT] or smtps://HOST[:PORT]"),
        (["--relay", "smtp://127.0.0.1:99999"], "bad port"),
        (["--relay", "smtp://127.0.0.1", "--relay-connections", "0"], "must be positive"),
        (["--relay", "smtp://127.0.0.1", "--relay-tls", "maybe"], "invalid choice"),
    ],
)  # fmt: skip
def test_bad_relay_configuration_is_one_line_and_exit_2(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    users = authfile(tmp_path, "alice:secret\n")
    result = subprocess.run(
        ofmipd_command("-a", str(users), "--check-config", *args),
        capture_output=True, text=True, env=server_env(), timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 or "usage:" in result.stderr
    assert "Traceback" not in result.stderr


def test_relay_table_in_toml(tmp_path: Path) -> None:
    users = authfile(tmp_path, "alice:secret\n")
    config = tmp_path / "ofmipd.toml"
    config.write_text(
        f'[[auth]]\nkind = "authfile"\npath = "{users}"\n'
        '[relay]\nurl = "smtp://127.0.0.1:2525"\ntls = "none"\nconnections = 3\n'
    )
    result = subprocess.run(
        ofmipd_command("--config", str(config), "--check-config"),
        capture_output=True, text=True, env=server_env(), timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "delivery: relay smtp://127.0.0.1:2525" in result.stdout


def test_the_downstream_failing_mid_transaction_is_a_4xx_and_nothing_queued(
    tmp_path: Path, postfix: Postfix
) -> None:
    with relay_daemon(tmp_path, postfix) as daemon:
        smtp = login(daemon)
        smtp.mail("lost@example.com")
        assert smtp.rcpt("ivan@example.org")[0] == 250
        postfix.stop()
        try:
            # DATA goes down before the client's 354: the MTA gone, DATA itself is the 4xx.
            with pytest.raises(smtplib.SMTPDataError) as refused:
                smtp.data(message("never"))
            smtp.quit()
        finally:
            postfix.start()
        code, reply = refused.value.smtp_code, refused.value.smtp_error
        assert code == 451 and reply.startswith(b"4.4.0")
        # The next transaction gets a fresh connection, not the broken one.
        smtp = login(daemon)
        assert smtp.sendmail("alice@example.com", ["judy@example.org"], message("7")) == {}
        smtp.quit()
    assert postfix.wait_for_log(r"to=<judy@example.org>.*status=sent")
    assert "ivan@" not in postfix.maillog()


def test_size_goes_down_with_mail_and_the_downstream_limit_answers(
    tmp_path: Path, postfix: Postfix
) -> None:
    # Postfix's message_size_limit is 10240000; ofmipd's own is 35 MiB.
    with relay_daemon(tmp_path, postfix) as daemon:
        smtp = login(daemon)
        code, reply = smtp.mail("alice@example.com", ["SIZE=20000000"])
        assert (code, reply) == (552, b"5.3.4 Message size exceeds fixed limit")
        smtp.rset()
        assert smtp.mail("alice@example.com", ["SIZE=2000", "BODY=8BITMIME"])[0] == 250
        smtp.quit()


def test_xforward_when_chosen(tmp_path: Path, postfix: Postfix) -> None:
    with relay_daemon(tmp_path, postfix, "--relay-identity", "xforward") as daemon:
        smtp = login(daemon)
        assert smtp.sendmail("alice@example.com", ["kim@example.org"], message("8")) == {}
        smtp.quit()
    [line] = [x for x in daemon.log_text().splitlines() if "queued as" in x]
    qid = line.rsplit("queued as ", 1)[1].strip()
    [smtpd] = postfix.wait_for_log(rf"{qid}: client=")
    assert "orig_client=" in smtpd  # Postfix logs what XFORWARD told it
    assert "sasl_username" not in smtpd  # XFORWARD carries no login


def test_identity_none_sends_neither(tmp_path: Path, postfix: Postfix) -> None:
    with relay_daemon(tmp_path, postfix, "--relay-identity", "none") as daemon:
        smtp = login(daemon)
        assert smtp.sendmail("alice@example.com", ["lee@example.org"], message("9")) == {}
        smtp.quit()
    [line] = [x for x in daemon.log_text().splitlines() if "queued as" in x]
    qid = line.rsplit("queued as ", 1)[1].strip()
    [smtpd] = postfix.wait_for_log(rf"{qid}: client=")
    assert "orig_client=" not in smtpd and "sasl_username" not in smtpd


@pytest.mark.slow  # its own Postfix: about 3 s to set up and start
def test_auto_identity_warns_once_at_start_when_the_mta_offers_neither(tmp_path: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="ofmipd-postfix-"))
    plain = Postfix(root, free_port(), identity=False)  # no XCLIENT, no XFORWARD offered
    plain.start()
    try:
        with relay_daemon(tmp_path, plain) as daemon:
            daemon.wait_for_log("offers neither XCLIENT nor XFORWARD")  # before any message
            for rcpt in ("mia@example.org", "ned@example.org"):
                smtp = login(daemon)
                assert smtp.sendmail("alice@example.com", [rcpt], message("10")) == {}
                smtp.quit()
            assert daemon.log_text().count("offers neither") == 1
        assert plain.wait_for_log(r"to=<ned@example.org>.*status=sent")
    finally:
        plain.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_start_says_the_relay_is_ready_with_what_it_offers(
    tmp_path: Path, postfix: Postfix
) -> None:
    with relay_daemon(tmp_path, postfix) as daemon:
        daemon.wait_for_log(
            f"relay smtp://127.0.0.1:{postfix.port}: ready (XCLIENT XFORWARD PIPELINING)"
        )


def tls_of(postfix: Postfix, qid: str) -> str:
    """'TLSv1.3' if the connection that queued `qid` had TLS, else ''. Postfix reuses an
    smtpd process for many connections: look from its last "connect from" before `qid`."""
    [smtpd] = postfix.wait_for_log(rf"{qid}: client=")
    pid = re.search(r"smtpd\[(\d+)\]", smtpd)
    assert pid
    tls = ""
    for line in postfix.maillog().splitlines():
        if f"smtpd[{pid.group(1)}]: " not in line:
            continue
        if "connect from" in line and "disconnect" not in line:
            tls = ""
        found = re.search(r"TLS connection established.*?(TLSv[0-9.]+) with cipher", line)
        if found:
            tls = found.group(1)
        if f"{qid}: client=" in line:
            return tls
    raise AssertionError(f"no {qid} in the log")


def send_one(daemon: Daemon, rcpt: str) -> str:
    smtp = login(daemon)
    smtp.mail("alice@example.com")
    assert smtp.rcpt(rcpt)[0] == 250
    code, reply = smtp.data(message(rcpt))
    smtp.quit()
    assert code == 250, reply
    return queue_id(reply)


@pytest.mark.parametrize(
    "url,args,env,tls",
    [
        ("smtp://127.0.0.1:{port}", [], {}, True),  # opportunistic: STARTTLS, unverified
        ("smtp://127.0.0.1:{port}", ["--relay-tls", "none"], {}, False),
        ("smtp://localhost:{port}", ["--relay-tls", "require"], {"SSL_CERT_FILE": "cert"}, True),
        ("smtps://127.0.0.1:{smtps}", [], {}, True),
    ],
    ids=["opportunistic", "none", "require-verified", "smtps"],
)
def test_tls_to_the_relay(
    tmp_path: Path, postfix: Postfix, url: str, args: list[str], env: dict[str, str], tls: bool
) -> None:
    relay = url.format(port=postfix.port, smtps=postfix.smtps_port)
    users = authfile(tmp_path, "alice:secret\n")
    port = free_port()
    environment = server_env(**{k: str(postfix.cert) for k in env})
    command = ["-p", f"127.0.0.1:{port}", "-a", str(users), "-L", "--relay", relay, *args]
    with Daemon(command, port, tmp_path, env=environment) as daemon:
        qid = send_one(daemon, "olga@example.org")
    assert bool(tls_of(postfix, qid)) is tls


def test_require_refuses_a_certificate_it_cannot_verify(tmp_path: Path, postfix: Postfix) -> None:
    # No SSL_CERT_FILE: the self-signed certificate is not trusted, so nothing goes down.
    with relay_daemon(tmp_path, postfix, "--relay-tls", "require") as daemon:
        smtp = login(daemon)
        code, reply = smtp.mail("alice@example.com")
        smtp.quit()
    assert code == 451 and reply.startswith(b"4.4.0")
    assert "certificate verify failed" in daemon.log_text()


def test_one_session_processes_under_tcpserver_relay_and_say_quit(
    tmp_path: Path, postfix: Postfix
) -> None:
    """`ofmipd -1 --relay` under the real tcpserver: each session is a process with a
    connection of its own downstream, which ends with QUIT, not a lost connection."""
    users = authfile(tmp_path, "alice:secret\n")
    port = free_port()
    tcpserver = subprocess.Popen(
        ["tcpserver", "-q", "-R", "-H", "127.0.0.1", str(port),
         *ofmipd_command("-1", "-a", str(users), "--hostname", "mx.test",
                         "--relay", f"smtp://127.0.0.1:{postfix.port}")],
        env=server_env(), stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port("127.0.0.1", port, tcpserver)
        replies = []
        for n in range(2):
            with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=30) as s:
                s.login("alice", "secret")
                s.mail("alice@example.com")
                s.rcpt(f"one{n}@example.org")
                replies.append(s.data(message(f"one-session {n}")))
    finally:
        tcpserver.terminate()
        tcpserver.wait(10)
    for n, (code, reply) in enumerate(replies):
        assert code == 250, reply
        qid = queue_id(reply)
        [smtpd] = postfix.wait_for_log(rf"{qid}: client=")
        assert "sasl_username=alice" in smtpd
        assert postfix.wait_for_log(rf"{qid}: to=<one{n}@example.org>.*status=sent")
        # How that connection ended, in Postfix's words: the first disconnect line of the
        # same smtpd process after the message. (XCLIENT shows as "xclient=0/1": Postfix
        # resets the session's counters for it.)
        process = re.search(r"(smtpd\[\d+\]): ", smtpd)
        assert process
        # (That process may have served other connections before: only a line after the
        # message counts, and it comes once the -1 process has said QUIT and gone.)
        deadline = time.monotonic() + 20
        while True:
            log = postfix.maillog()
            after = log[log.index(smtpd) :].splitlines()
            ends = [x for x in after if f"{process.group(1)}: disconnect from" in x]
            if ends or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert ends, after
        assert " mail=1 " in ends[0] and " quit=1 " in ends[0], ends[0]


def test_smtputf8_and_8bitmime_go_down_with_a_utf8_message(
    tmp_path: Path, postfix: Postfix
) -> None:
    """A UTF-8 address and an 8-bit message go through to Postfix. (Postfix takes them
    even undeclared: test_relay_pool shows which MAIL parameters go down.)"""
    with relay_daemon(tmp_path, postfix) as daemon:
        smtp = login(daemon)
        assert smtp.has_extn("smtputf8") and smtp.has_extn("8bitmime")
        code, _ = smtp.mail("alice@example.com", ["SMTPUTF8", "BODY=8BITMIME"])
        assert code == 250
        assert smtp.rcpt("jörg@example.org")[0] == 250
        body = "From: alice@example.com\r\nSubject: grüße\r\n\r\nnaïve\r\n".encode()
        code, reply = smtp.data(body)
        smtp.quit()
    assert code == 250, reply
    qid = queue_id(reply)
    assert postfix.wait_for_log(rf"{qid}: to=<jörg@example.org>.*status=sent")
