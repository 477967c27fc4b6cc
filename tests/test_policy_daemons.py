"""--policy against the real policy daemons admins run (Debian's postfwd and
policyd-rate-limit, on private ports with private configurations), the conf/postfwd
recipe as shipped, and the relay path's END-OF-MESSAGE check before the final dot."""

from __future__ import annotations

import re
import shutil
import signal
import smtplib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.deploy_support import instantiate
from tests.ofmipd_server import CAPTURE, Daemon, authfile, captured_messages, server_env
from tests.policy_support import Postfwd, RateLimitDaemon, ScriptedPolicy, send
from tests.postfix_server import Postfix

pytestmark = pytest.mark.slow  # real daemons, several messages each

RCPT = "bob@example.net"
DEFAULT = (451, b"4.3.5 Server configuration problem")


@pytest.fixture
def workdir() -> Iterator[Path]:
    """Not under pytest's tmp_path: its 0700 parent keeps postfwd (user nobody) out."""
    path = Path(tempfile.mkdtemp(prefix="ofmipd-policy-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def daemon_with(tmp_path: Path, capture: Path, *args: str) -> Daemon:
    users = authfile(tmp_path, "alice:secret\ncarol:secret\n")
    port = free_port()
    return Daemon(
        ["-p", f"127.0.0.1:{port}", "--hostname", "mx.test", "-a", str(users), "-L",
         "--sendmail", CAPTURE, *args],
        port, tmp_path, env=server_env(CAPTURE_DIR=str(capture)),
    )  # fmt: skip


def login(daemon: Daemon, user: str) -> smtplib.SMTP:
    smtp = smtplib.SMTP(daemon.host, daemon.port, timeout=60)
    smtp.login(user, "secret")
    return smtp


def test_conf_postfwd_recipe_limits_one_login_and_not_another(
    tmp_path: Path, workdir: Path, capture: Path
) -> None:
    # The recipe as shipped, with 3 messages an hour instead of 100 so the test is short.
    rules = workdir / "postfwd.cf"
    rules.write_text(
        instantiate("postfwd/postfwd.cf", {"rate(sasl_username/100/": "rate(sasl_username/3/"})
    )
    postfwd = Postfwd(workdir, rules)
    postfwd.start()
    try:
        users = authfile(tmp_path, "alice:secret\ncarol:secret\n")
        port = free_port()
        config = tmp_path / "ofmipd.toml"
        config.write_text(
            instantiate(
                "postfwd/ofmipd.toml",
                {
                    "0.0.0.0:587": f"127.0.0.1:{port}",
                    "/etc/ofmipd/users": str(users),
                    "/usr/sbin/sendmail": CAPTURE,
                    "inet:127.0.0.1:10040": postfwd.service,
                },
            )
        )
        env = server_env(CAPTURE_DIR=str(capture))
        with Daemon(["--config", str(config), "-L"], port, tmp_path, env=env) as daemon:
            codes, refused = over_the_limit(daemon)
    finally:
        postfwd.stop()
    assert codes == [250, 250, 250]
    assert refused == (450, b"4.7.1 too many messages from alice, try later")
    assert len(captured_messages(capture)) == 4


def over_the_limit(daemon: Daemon) -> tuple[list[int], tuple[int, bytes]]:
    """Three messages from alice, then the fourth one's reply; carol's message goes
    through meanwhile (a limit per login, not per server)."""
    alice = login(daemon, "alice")
    codes = [send(alice, "alice@example.org", RCPT)[0] for _ in range(3)]
    refused = send(alice, "alice@example.org", RCPT)
    carol = login(daemon, "carol")
    assert send(carol, "carol@example.org", RCPT)[0] == 250
    alice.quit()
    carol.quit()
    return codes, refused


def test_policyd_rate_limit_defers_the_login_over_its_limit_and_not_another(
    tmp_path: Path, workdir: Path, capture: Path
) -> None:
    limiter = RateLimitDaemon(workdir, limit=3, window=3600)
    limiter.start()
    try:
        with daemon_with(tmp_path, capture, "--policy", limiter.service) as daemon:
            codes, refused = over_the_limit(daemon)
    finally:
        limiter.stop()
    assert codes == [250, 250, 250]
    # its fail_action is "defer_if_permit Rate limit reach, retry later", at RCPT
    assert refused == (450, b"4.7.1 Rate limit reach, retry later")
    assert len(captured_messages(capture)) == 4


def dunno_daemon(kind: str, workdir: Path) -> Postfwd | RateLimitDaemon:
    """A daemon that lets everything through: postfwd with one DUNNO rule, or
    policyd-rate-limit with a limit never reached."""
    if kind == "postfwd":
        return Postfwd(workdir, "id=ANY; action=DUNNO\n")
    return RateLimitDaemon(workdir, limit=1000, window=60)


@pytest.mark.parametrize("kind", ["postfwd", "policyd-rate-limit"])
def test_a_stopped_policy_daemon_gives_the_default_action(
    tmp_path: Path, workdir: Path, capture: Path, kind: str
) -> None:
    daemon_ = dunno_daemon(kind, workdir)
    daemon_.start()
    daemon_.stop()
    with daemon_with(tmp_path, capture, "--policy", daemon_.service) as daemon:
        alice = login(daemon, "alice")
        assert send(alice, "alice@example.org", RCPT) == DEFAULT
        alice.quit()
        log = daemon.log_text()
    assert captured_messages(capture) == []
    assert re.search(r"policy inet:127\.0\.0\.1:\d+ at RCPT: .*default action 451 4\.3\.5", log)


@pytest.mark.parametrize("kind", ["postfwd", "policyd-rate-limit"])
def test_a_policy_daemon_killed_mid_session_then_restarted(
    tmp_path: Path, workdir: Path, capture: Path, kind: str
) -> None:
    policy = dunno_daemon(kind, workdir)
    policy.start()
    try:
        with daemon_with(tmp_path, capture, "--policy", policy.service) as daemon:
            alice = login(daemon, "alice")
            assert send(alice, "alice@example.org", RCPT)[0] == 250  # the connection is kept
            alice.mail("alice@example.org")
            assert alice.rcpt(RCPT)[0] == 250
            policy.stop(signal.SIGKILL)  # between RCPT and END-OF-MESSAGE
            assert alice.data(b"Subject: t\r\n\r\nhi\r\n") == DEFAULT
            assert send(alice, "alice@example.org", RCPT) == DEFAULT
            policy.start()  # back on the same port: the same session sends again
            assert send(alice, "alice@example.org", RCPT)[0] == 250
            alice.quit()
    finally:
        policy.stop()
    assert len(captured_messages(capture)) == 2


def kept(postfix: Postfix, reply: tuple[int, bytes], rcpt: str) -> bytes:
    """The message Postfix's keep transport got for a 250 "queued as ID" reply."""
    found = re.search(rb"queued as ([0-9A-Z]+)", reply[1])
    assert reply[0] == 250 and found, reply
    qid = found.group(1).decode()
    assert postfix.wait_for_log(rf"{qid}: to=<{rcpt}>.*status=sent", timeout=60)
    return (postfix.kept / qid).read_bytes()


def test_relay_end_of_message_refusal_is_before_the_final_dot(tmp_path: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="ofmipd-postfix-"))
    postfix = Postfix(root, free_port(), keep=True)
    postfix.start()

    def answer(request: dict[str, str]) -> bytes:
        state, recipient = request["protocol_state"], request["recipient"]
        if state == "END-OF-MESSAGE" and recipient.startswith("refuse"):
            return b"action=REJECT 5.7.1 not this one\n\n"
        if state == "END-OF-MESSAGE" and recipient.startswith("late"):
            return b"action=PREPEND X-Policy: late\n\n"  # the header has gone down
        if state == "RCPT" and recipient.startswith("tag"):
            return b"action=PREPEND X-Policy: tagged\n\n"
        return b"action=DUNNO\n\n"

    try:
        with ScriptedPolicy(answer) as policy:
            users = authfile(tmp_path, "alice:secret\n")
            port = free_port()
            relay = f"smtp://127.0.0.1:{postfix.port}"
            args = ["-p", f"127.0.0.1:{port}", "-a", str(users), "-L", "--hostname", "mx.test",
                    "--policy", policy.service, "--relay", relay]  # fmt: skip
            with Daemon(args, port, tmp_path, env=server_env()) as daemon:
                alice = login(daemon, "alice")
                body = b"From: alice@example.org\r\nSubject: t\r\n\r\nhi\r\n"
                refused = send(alice, "alice@example.org", "refuse@example.net", body)
                late = send(alice, "alice@example.org", "late@kept.test", body)
                tagged = send(alice, "alice@example.org", "tag@kept.test", body)
                alice.quit()
                assert postfix.wait_for_log(r"lost connection after DATA")
        assert refused == (554, b"5.7.1 not this one")
        tagged_message = kept(postfix, tagged, "tag@kept.test")
        assert tagged_message.index(b"X-Policy: tagged") < tagged_message.index(b"by mx.test")
        assert b"X-Policy" not in kept(postfix, late, "late@kept.test")  # too late: DUNNO
        assert "to=<refuse@example.net>" not in postfix.maillog()
    finally:
        postfix.stop()
        shutil.rmtree(root, ignore_errors=True)
