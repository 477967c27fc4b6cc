"""--policy: the Postfix policy delegation client, against a scripted policy server for
what the real daemons cannot be made to do (tests/test_policy_daemons.py has those):
each access(5) action, garbage, hostile attribute values, kept connections, timeouts."""

from __future__ import annotations

import asyncio
import signal
import smtplib
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ofmipd.errors import ConfigError
from ofmipd.policy_client import (
    DEFAULT_ACTION,
    PolicyClients,
    PolicyDecision,
    PolicyService,
    encode_request,
    parse_action,
    parse_service,
)
from tests.loop_ticker import with_ticker
from tests.ofmipd_server import (
    CAPTURE,
    Daemon,
    authfile,
    captured_messages,
    ofmipd_command,
    server_env,
    start_daemon,
)
from tests.policy_support import Request, ScriptedPolicy, action, dunno, send
from tests.ports import free_port
from tests.tls_support import client_context, make_certificate

SENDER, RCPT = "alice@example.org", "bob@example.net"


@pytest.fixture
def users(tmp_path: Path) -> Path:
    return authfile(tmp_path, "alice:secret\nbob:secret\n")


def login(daemon: Daemon, user: str = "alice") -> smtplib.SMTP:
    smtp = smtplib.SMTP(daemon.host, daemon.port, timeout=30)
    smtp.login(user, "secret")
    return smtp


# ---- the protocol, as pure functions --------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "reply"),
    [
        ("OK", "permit", ""),
        ("ok", "permit", ""),
        ("123", "permit", ""),  # all-numeric: OK (access(5))
        ("DUNNO", "dunno", ""),
        ("REJECT", "reply", "554 5.7.1 Access denied"),
        ("REJECT go away", "reply", "554 5.7.1 go away"),
        ("DEFER", "reply", "450 4.7.1 Try again later"),
        ("defer 4.7.2 later", "reply", "450 4.7.2 later"),
        ("DEFER_IF_PERMIT slow down", "defer_if_permit", "450 4.7.1 slow down"),
        ("DEFER_IF_REJECT hm", "defer_if_reject", "450 4.7.1 hm"),
        ("450 4.7.1 sorry", "reply", "450 4.7.1 sorry"),
        ("550 no", "reply", "550 5.7.1 no"),
        ("REJECT 2.0.0 odd", "reply", "554 5.7.1 2.0.0 odd"),  # the classes must agree
        ("421 4.7.0 bye", "reply", "421 4.7.0 bye"),
        ("521 bye", "reply", "521 5.7.1 bye"),
        ("PREPEND X-Tag: one", "prepend", ""),
        ("PREPEND not a header", "prepend", ""),  # refused where it is used
        ("INFO noted", "log", ""),
        ("WARN noted", "log", ""),
        ("HOLD", "unsupported", ""),
        ("DISCARD", "unsupported", ""),
        ("REDIRECT a@b", "unsupported", ""),
        ("BCC a@b", "unsupported", ""),
        ("FILTER smtp:x", "unsupported", ""),
        ("permit_mynetworks", "garbage", ""),
        ("", "garbage", ""),
        ("250 fine", "garbage", ""),
        ("REJECT a\rb", "garbage", ""),  # a CR would split the SMTP reply
        ("REJECT \x00", "garbage", ""),
        ("PREPEND X-A: b\x0bc", "garbage", ""),  # a control character
        ("REJECT " + "x" * 1000, "garbage", ""),
    ],
)
def test_actions_read_as_access5_defines_them(text: str, kind: str, reply: str) -> None:
    parsed = parse_action(text)
    assert (parsed.kind, parsed.reply) == (kind, reply)


def test_421_and_521_disconnect() -> None:
    assert PolicyDecision(parse_action("421 4.7.0 bye").reply).disconnect
    assert PolicyDecision(parse_action("521 bye").reply).disconnect
    assert not PolicyDecision(parse_action("450 later").reply).disconnect
    assert not PolicyDecision(None).disconnect


def test_service_notation_is_postfixs() -> None:
    assert parse_service("inet:127.0.0.1:10040") == ("inet", "127.0.0.1", 10040)
    assert parse_service("inet:[::1]:10040") == ("inet", "::1", 10040)
    assert parse_service("unix:/run/policy.sock") == ("unix", "/run/policy.sock", 0)
    for bad in ("127.0.0.1:10040", "inet:host", "inet:host:0", "unix:", "tcp:a:1"):
        with pytest.raises(ConfigError):
            parse_service(bad)


def test_no_value_can_add_an_attribute_or_end_the_request() -> None:
    hostile = "x\nrecipient=victim@example.com\n\naction=OK\r\x00\x7f"
    wire = encode_request({"request": "smtpd_access_policy", "helo_name": hostile})
    lines = wire.split(b"\n")
    assert lines == [
        b"request=smtpd_access_policy",
        b"helo_name=x?recipient=victim@example.com??action=OK???",
        b"",
        b"",
    ]


def test_utf8_values_go_as_utf8() -> None:
    assert encode_request({"sender": "jörg@exämple.org"}) == "sender=jörg@exämple.org\n\n".encode()


# ---- through a running ofmipd ---------------------------------------------------------


def test_every_attribute_is_sent_and_instance_is_one_per_message(
    tmp_path: Path, users: Path, capture: Path
) -> None:
    with ScriptedPolicy(dunno) as policy:
        with start_daemon(tmp_path, users, capture, "--policy", policy.service) as daemon:
            smtp = login(daemon)
            smtp.ehlo("client.example")
            assert send(smtp, SENDER, RCPT)[0] == 250
            smtp.sendmail(SENDER, [RCPT, "carol@example.net"], b"Subject: two\r\n\r\nhi\r\n")
            smtp.quit()
    rcpt, eom, rcpt2, rcpt3, eom2 = policy.requests
    assert policy.states() == ["RCPT", "END-OF-MESSAGE", "RCPT", "RCPT", "END-OF-MESSAGE"]
    assert (rcpt3["recipient"], rcpt3["recipient_count"]) == ("carol@example.net", "0")
    assert (eom2["recipient"], eom2["recipient_count"]) == ("", "2")  # only when just one
    expected = {
        "request": "smtpd_access_policy",
        "protocol_name": "ESMTP",
        "helo_name": "client.example",
        "sender": SENDER,
        "recipient": RCPT,
        "client_address": "127.0.0.1",
        "server_address": "127.0.0.1",
        "server_port": str(daemon.port),
        "sasl_method": "CRAM-MD5",
        "sasl_username": "alice",
        "encryption_protocol": "",
        "encryption_cipher": "",
        "encryption_keysize": "0",  # plaintext, as SMTPD_POLICY_README says
    }
    for name, value in expected.items():
        assert rcpt[name] == value, name
    for name in ("queue_id", "recipient_count", "client_name", "reverse_client_name",
                 "client_port", "instance", "size", "encryption_cipher",
                 "encryption_keysize"):  # fmt: skip
        assert name in rcpt, name
    assert rcpt["client_port"].isdigit()
    # non-zero only at END-OF-MESSAGE (SMTPD_POLICY_README)
    assert (rcpt["recipient_count"], eom["recipient_count"]) == ("0", "1")
    assert rcpt["queue_id"] == "" and len(eom["queue_id"]) == 16
    assert eom["queue_id"].encode() in captured_messages(capture)[0][1]
    assert int(eom["size"]) > 0
    assert rcpt["instance"] == eom["instance"] != rcpt2["instance"] == rcpt3["instance"]
    assert rcpt3["instance"] == eom2["instance"]


def test_tls_attributes_name_the_protocol_and_cipher(
    tmp_path: Path, users: Path, capture: Path
) -> None:
    cert, key = make_certificate(tmp_path)
    with ScriptedPolicy(dunno) as policy:
        args = ("--policy", policy.service, "--tls", "optional", "--ssl-cert", str(cert),
                "--ssl-key", str(key))  # fmt: skip
        with start_daemon(tmp_path, users, capture, *args) as daemon:
            smtp = smtplib.SMTP(daemon.host, daemon.port, timeout=30)
            smtp.starttls(context=client_context(cert))
            smtp.login("alice", "secret")
            assert send(smtp, SENDER, RCPT)[0] == 250
            smtp.quit()
    request = policy.requests[0]
    assert request["encryption_protocol"].startswith("TLSv1.")
    assert request["encryption_cipher"] and request["encryption_keysize"].isdigit()


@pytest.mark.parametrize(
    ("answer", "code", "text"),
    [
        ("REJECT no mail for you", 554, b"5.7.1 no mail for you"),
        ("DEFER come back later", 450, b"4.7.1 come back later"),
        ("DEFER_IF_PERMIT over the limit", 450, b"4.7.1 over the limit"),
        ("552 5.2.2 mailbox full", 552, b"5.2.2 mailbox full"),
        ("HOLD", 451, b"4.3.5 Server configuration problem"),
        ("DISCARD", 451, b"4.3.5 Server configuration problem"),
        ("REDIRECT other@example.com", 451, b"4.3.5 Server configuration problem"),
        ("BCC spy@example.com", 451, b"4.3.5 Server configuration problem"),
        ("FILTER smtp:[127.0.0.1]:10025", 451, b"4.3.5 Server configuration problem"),
        ("what is this", 451, b"4.3.5 Server configuration problem"),
        ("REJECT x\r250 2.0.0 fake", 451, b"4.3.5 Server configuration problem"),
    ],
)
def test_each_refusing_action_is_the_rcpt_reply_and_nothing_is_sent(
    tmp_path: Path, users: Path, capture: Path, answer: str, code: int, text: bytes
) -> None:
    with ScriptedPolicy(action(answer)) as policy:
        with start_daemon(tmp_path, users, capture, "-L", "--policy", policy.service) as daemon:
            smtp = login(daemon)
            assert send(smtp, SENDER, RCPT) == (code, text)
            smtp.quit()
            log = daemon.log_text()
    assert captured_messages(capture) == []
    if code == 451:  # never silently ignored: the log says what the server asked for
        assert f"answered {answer.split()[0]}" in log or "answered " + answer in log
        assert "default action 451 4.3.5" in log


def test_refusals_are_counted_by_state_and_reply_class(
    tmp_path: Path, users: Path, capture: Path
) -> None:
    import urllib.request

    port = free_port()
    metrics = ("--metrics", f"127.0.0.1:{port}")
    with ScriptedPolicy(action("REJECT not you")) as policy:
        with start_daemon(tmp_path, users, capture, "--policy", policy.service, *metrics) as d:
            smtp = login(d)
            assert send(smtp, SENDER, RCPT)[0] == 554
            assert send(smtp, SENDER, RCPT)[0] == 554
            smtp.quit()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as page:
                text = page.read().decode()
    assert 'ofmipd_policy_refusals_total{reply="5xx",state="RCPT"} 2.0' in text


@pytest.mark.parametrize("answer", ["INFO just so you know", "WARN look at this", "OK", "DUNNO"])
def test_info_warn_ok_and_dunno_let_the_message_through(
    tmp_path: Path, users: Path, capture: Path, answer: str
) -> None:
    with ScriptedPolicy(action(answer)) as policy:
        with start_daemon(tmp_path, users, capture, "-L", "--policy", policy.service) as daemon:
            smtp = login(daemon)
            assert send(smtp, SENDER, RCPT)[0] == 250
            smtp.quit()
            log = daemon.log_text()
    assert len(captured_messages(capture)) == 1
    if answer.startswith(("INFO", "WARN")):
        assert f"policy {policy.service} at RCPT: {answer}" in log


@pytest.mark.parametrize("answer", ["421 4.7.0 go away now", "521 5.7.0 never again"])
def test_421_and_521_end_the_session(
    tmp_path: Path, users: Path, capture: Path, answer: str
) -> None:
    with ScriptedPolicy(action(answer)) as policy:
        with start_daemon(tmp_path, users, capture, "--policy", policy.service) as daemon:
            smtp = login(daemon)
            smtp.mail(SENDER)
            code, text = smtp.rcpt(RCPT)
            assert (code, text) == (int(answer[:3]), answer[4:].encode())
            with pytest.raises(smtplib.SMTPServerDisconnected):
                smtp.noop()


def test_prepend_adds_the_header_above_received(tmp_path: Path, users: Path, capture: Path) -> None:
    with ScriptedPolicy(action("PREPEND X-Policy-Score: 3.5")) as policy:
        with start_daemon(tmp_path, users, capture, "--policy", policy.service) as daemon:
            smtp = login(daemon)
            assert send(smtp, SENDER, RCPT)[0] == 250
            assert send(smtp, SENDER, RCPT)[0] == 250
            smtp.quit()
    first, second = (message for _, message in captured_messages(capture))
    assert first.startswith(b"X-Policy-Score: 3.5\r\nReceived: from ")
    assert second.count(b"X-Policy-Score") == 1  # one message's headers stay with it


@pytest.mark.parametrize(
    ("state", "header", "why"),
    [
        ("END-OF-MESSAGE", "X-Late: yes", "too late, the header is gone"),
        ("RCPT", "no colon here", "not a header"),
    ],
)
def test_a_prepend_that_cannot_be_done_is_logged_and_taken_as_dunno(
    tmp_path: Path, users: Path, capture: Path, state: str, header: str, why: str
) -> None:
    # As Postfix's smtpd_check.c: a warning, and the message goes on.
    def answer(request: Request) -> bytes:
        if request["protocol_state"] == state:
            return f"action=PREPEND {header}\n\n".encode()
        return b"action=DUNNO\n\n"

    with ScriptedPolicy(answer) as policy:
        with start_daemon(tmp_path, users, capture, "-L", "--policy", policy.service) as daemon:
            smtp = login(daemon)
            assert send(smtp, SENDER, RCPT)[0] == 250
            smtp.quit()
            log = daemon.log_text()
    ((_, message),) = captured_messages(capture)
    assert header.encode() not in message
    assert f"at {state} answered PREPEND {header}: {why}; taken as DUNNO" in log


def test_end_of_message_refusal_keeps_the_message(
    tmp_path: Path, users: Path, capture: Path
) -> None:
    def answer(request: Request) -> bytes:
        if request["protocol_state"] == "END-OF-MESSAGE":
            return b"action=REJECT 5.7.0 message too suspicious\n\n"
        return b"action=DUNNO\n\n"

    with ScriptedPolicy(answer) as policy:
        with start_daemon(tmp_path, users, capture, "--policy", policy.service) as daemon:
            smtp = login(daemon)
            assert send(smtp, SENDER, RCPT) == (554, b"5.7.0 message too suspicious")
            smtp.quit()
    assert captured_messages(capture) == []


def test_services_are_asked_in_order_and_the_first_not_dunno_decides(
    tmp_path: Path, users: Path, capture: Path
) -> None:
    with (
        ScriptedPolicy(dunno) as first,
        ScriptedPolicy(action("REJECT second says no")) as second,
        ScriptedPolicy(action("OK")) as third,
    ):
        args = ("--policy", first.service, "--policy", second.service, "--policy", third.service)
        with start_daemon(tmp_path, users, capture, *args) as daemon:
            smtp = login(daemon)
            assert send(smtp, SENDER, RCPT) == (554, b"5.7.1 second says no")
            smtp.quit()
    assert (first.states(), second.states(), third.states()) == (["RCPT"], ["RCPT"], [])


def test_ok_ends_the_list_and_defer_if_permit_still_defers(
    tmp_path: Path, users: Path, capture: Path
) -> None:
    with (
        ScriptedPolicy(action("DEFER_IF_PERMIT wait")) as first,
        ScriptedPolicy(action("OK")) as second,
        ScriptedPolicy(action("REJECT never asked")) as third,
    ):
        args = ("--policy", first.service, "--policy", second.service, "--policy", third.service)
        with start_daemon(tmp_path, users, capture, *args) as daemon:
            smtp = login(daemon)
            assert send(smtp, SENDER, RCPT) == (450, b"4.7.1 wait")
            smtp.quit()
    assert third.requests == []


def test_defer_if_reject_turns_a_later_reject_into_450(
    tmp_path: Path, users: Path, capture: Path
) -> None:
    with (
        ScriptedPolicy(action("DEFER_IF_REJECT not sure yet")) as first,
        ScriptedPolicy(action("REJECT no")) as second,
    ):
        args = ("--policy", first.service, "--policy", second.service)
        with start_daemon(tmp_path, users, capture, *args) as daemon:
            smtp = login(daemon)
            assert send(smtp, SENDER, RCPT) == (450, b"4.7.1 not sure yet")
            smtp.quit()


def test_at_mail_is_asked_only_when_configured(tmp_path: Path, users: Path, capture: Path) -> None:
    def answer(request: Request) -> bytes:
        if request["protocol_state"] == "MAIL":
            return b"action=REJECT 5.7.1 sender refused\n\n"
        return b"action=DUNNO\n\n"

    with ScriptedPolicy(answer) as policy:
        config = tmp_path / "ofmipd.toml"
        config.write_text(f'[[policy]]\nservice = "{policy.service}"\nat_mail = true\n')
        with start_daemon(tmp_path, users, capture, "--config", str(config)) as daemon:
            smtp = login(daemon)
            assert smtp.mail(SENDER) == (554, b"5.7.1 sender refused")
            smtp.quit()
        assert policy.requests[0]["sender"] == SENDER
        assert policy.requests[0]["recipient"] == ""
        policy.requests.clear()
        with start_daemon(tmp_path, users, capture, "--policy", policy.service) as daemon:
            smtp = login(daemon)
            assert send(smtp, SENDER, RCPT)[0] == 250
            smtp.quit()
        assert "MAIL" not in policy.states()


@pytest.mark.parametrize(
    "reply",
    [
        b"no action here\n\n",
        b"result=OK\n\n",
        b"action=OK\n" + b"x" * 5000 + b"\n\n",  # over-long
        b"action=" + b"A" * 5000 + b"\n\n",
        None,  # the server hangs up
    ],
)
def test_garbage_or_silence_gets_the_default_action(
    tmp_path: Path, users: Path, capture: Path, reply: bytes | None
) -> None:
    with ScriptedPolicy(lambda request: reply) as policy:
        with start_daemon(tmp_path, users, capture, "--policy", policy.service) as daemon:
            smtp = login(daemon)
            assert send(smtp, SENDER, RCPT) == (451, b"4.3.5 Server configuration problem")
            smtp.quit()
    assert captured_messages(capture) == []


def test_the_default_action_can_be_set_and_can_fail_open(
    tmp_path: Path, users: Path, capture: Path
) -> None:
    port = ScriptedPolicy(dunno)
    port.close()  # nothing listens there now
    args = ("--policy", port.service, "--policy-default-action", "DEFER 4.7.0 policy down")
    with start_daemon(tmp_path, users, capture, *args) as daemon:
        smtp = login(daemon)
        assert send(smtp, SENDER, RCPT) == (450, b"4.7.0 policy down")
        smtp.quit()
    args = ("--policy", port.service, "--policy-default-action", "DUNNO")
    with start_daemon(tmp_path, users, capture, *args) as daemon:
        smtp = login(daemon)
        assert send(smtp, SENDER, RCPT)[0] == 250
        smtp.quit()


def test_hostile_helo_and_address_cannot_inject_attributes(
    tmp_path: Path, users: Path, capture: Path
) -> None:
    with ScriptedPolicy(dunno) as policy:
        with start_daemon(tmp_path, users, capture, "--policy", policy.service) as daemon:
            with socket.create_connection((daemon.host, daemon.port), timeout=10) as raw:
                stream = raw.makefile("rwb")
                stream.readline()
                # A bare CR and a NUL inside the EHLO line, then a quoted address with a
                # control character, then an ordinary one.
                stream.write(b"EHLO evil\rsasl_username=root\x00\x0bx\r\n")
                stream.write(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")
                stream.write(b"MAIL FROM:<alice@example.org>\r\n")
                stream.write(b'RCPT TO:<"a\x01recipient=x"@example.net>\r\n')
                stream.write(b"RCPT TO:<bob@example.net>\r\nQUIT\r\n")
                stream.flush()
                replies = stream.read()
    assert b"235" in replies
    assert policy.raw, replies
    for request in policy.raw:
        names = [line.split(b"=", 1)[0] for line in request.splitlines()]
        assert len(names) == len(set(names)), request  # no attribute twice
        assert b"\x00" not in request and b"\r" not in request and b"\x0b" not in request
    assert policy.requests[0]["sasl_username"] == "alice"
    assert policy.requests[0]["helo_name"].startswith("evil?sasl_username=root")


def test_a_kept_connection_is_reused_and_retried_once_when_broken(
    tmp_path: Path, users: Path, capture: Path
) -> None:
    answers = iter([b"action=DUNNO\n\n", b"action=DUNNO\n\n", None])

    def answer(request: Request) -> bytes | None:
        # The third request's connection is closed unanswered, as a server restarting
        # or timing out its idle connections would; then it answers normally.
        return next(answers, b"action=DUNNO\n\n")

    with ScriptedPolicy(answer) as policy:
        with start_daemon(tmp_path, users, capture, "--policy", policy.service) as daemon:
            smtp = login(daemon)
            assert send(smtp, SENDER, RCPT)[0] == 250
            assert send(smtp, SENDER, RCPT)[0] == 250
            smtp.quit()
    assert policy.connections == 2  # one kept for three requests, one after the break
    assert len(policy.requests) == 5


def test_max_idle_closes_a_kept_connection(tmp_path: Path, users: Path, capture: Path) -> None:
    with ScriptedPolicy(dunno) as policy:
        config = tmp_path / "ofmipd.toml"
        config.write_text(f'[[policy]]\nservice = "{policy.service}"\nmax_idle = 0.2\n')
        with start_daemon(tmp_path, users, capture, "--config", str(config)) as daemon:
            smtp = login(daemon)
            smtp.mail(SENDER)
            assert smtp.rcpt(RCPT)[0] == 250
            time.sleep(0.3)  # idle longer than max_idle between RCPT and END-OF-MESSAGE
            assert smtp.data(b"Subject: t\r\n\r\nhi\r\n")[0] == 250
            smtp.quit()
    assert policy.connections == 2


def test_max_ttl_opens_a_new_connection(tmp_path: Path, users: Path, capture: Path) -> None:
    with ScriptedPolicy(dunno) as policy:
        config = tmp_path / "ofmipd.toml"
        config.write_text(f'[[policy]]\nservice = "{policy.service}"\nmax_ttl = 0.2\n')
        with start_daemon(tmp_path, users, capture, "--config", str(config)) as daemon:
            smtp = login(daemon)
            assert send(smtp, SENDER, RCPT)[0] == 250
            time.sleep(0.3)
            assert send(smtp, SENDER, RCPT)[0] == 250
            smtp.quit()
    assert policy.connections == 2


def test_a_slow_policy_server_delays_only_its_own_session(
    tmp_path: Path, users: Path, capture: Path
) -> None:
    release = threading.Event()

    def answer(request: Request) -> bytes:
        if request["sasl_username"] == "alice":
            release.wait(20)
        return b"action=DUNNO\n\n"

    with ScriptedPolicy(answer) as policy:
        with start_daemon(tmp_path, users, capture, "--policy", policy.service) as daemon:
            slow = login(daemon, "alice")
            slow.mail(SENDER)
            slow.send(f"RCPT TO:<{RCPT}>\r\n".encode())  # its answer waits for the server
            time.sleep(0.2)
            started = time.monotonic()
            fast = login(daemon, "bob")
            assert send(fast, "bob@example.org", RCPT)[0] == 250
            elapsed = time.monotonic() - started
            release.set()
            assert slow.getreply()[0] == 250
            fast.quit()
            slow.quit()
    assert elapsed < 3


def test_a_policy_timeout_gives_the_default_action_in_time(
    tmp_path: Path, users: Path, capture: Path
) -> None:
    release = threading.Event()

    def answer(request: Request) -> bytes:
        release.wait(20)
        return b"action=DUNNO\n\n"

    with ScriptedPolicy(answer) as policy:
        args = ("--policy", policy.service, "--policy-timeout", "0.5")
        with start_daemon(tmp_path, users, capture, *args) as daemon:
            smtp = login(daemon)
            started = time.monotonic()
            assert send(smtp, SENDER, RCPT) == (451, b"4.3.5 Server configuration problem")
            assert time.monotonic() - started < 3
            release.set()
            smtp.quit()


def test_the_client_never_blocks_the_event_loop(tmp_path: Path) -> None:
    """Asked in-process while the server takes 1 s: the loop stays on time."""
    release = threading.Event()

    def answer(request: Request) -> bytes:
        release.wait(1.0)
        return b"action=REJECT slow no\n\n"

    async def ask() -> str | None:
        clients = PolicyClients((PolicyService(policy.service),))
        try:
            attributes = {"request": "smtpd_access_policy", "protocol_state": "RCPT"}
            return (await clients.check(attributes, "t")).reply
        finally:
            clients.close()

    with ScriptedPolicy(answer) as policy:
        reply, worst = asyncio.run(with_ticker(ask()))
    assert reply == "554 5.7.1 slow no"
    assert worst < 0.4, f"event loop stalled {worst * 1000:.0f} ms"  # a blocking client: 1 s


def test_unix_socket_service(tmp_path: Path, users: Path, capture: Path) -> None:
    path = tmp_path / "policy.sock"

    async def serve(ready: threading.Event, stop: threading.Event) -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while await reader.readuntil(b"\n\n"):
                writer.write(b"action=REJECT 5.7.1 from a unix socket\n\n")
                await writer.drain()

        server = await asyncio.start_unix_server(handle, str(path))
        ready.set()
        await asyncio.to_thread(stop.wait)
        server.close()

    ready, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=asyncio.run, args=(serve(ready, stop),), daemon=True)
    thread.start()
    ready.wait(5)
    try:
        with start_daemon(tmp_path, users, capture, "--policy", f"unix:{path}") as daemon:
            smtp = login(daemon)
            assert send(smtp, SENDER, RCPT) == (554, b"5.7.1 from a unix socket")
            smtp.quit()
    finally:
        stop.set()
        thread.join(5)


# ---- configuration --------------------------------------------------------------------


def check_config(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    users = authfile(tmp_path, "alice:secret\n")
    return subprocess.run(
        ofmipd_command("--check-config", "-a", str(users), *args),
        capture_output=True, text=True, env=server_env(), timeout=60,
    )  # fmt: skip


def test_check_config_lists_the_policy_services(tmp_path: Path) -> None:
    config = tmp_path / "ofmipd.toml"
    config.write_text(
        'policy_timeout = 7\n[[policy]]\nservice = "inet:127.0.0.1:10040"\n'
        '[[policy]]\nservice = "unix:/run/p.sock"\nat_mail = true\n'
        'default_action = "DUNNO"\nmax_idle = 30\n'
    )
    done = check_config(tmp_path, "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert "policy services (in order" in done.stdout
    assert (
        "1. inet:127.0.0.1:10040 (timeout 7s, default action "
        f"'{DEFAULT_ACTION}', asked at RCPT and END-OF-MESSAGE, connections kept 300s idle and "
        "1000s in all)" in done.stdout
    )
    assert "2. unix:/run/p.sock (timeout 7s, default action 'DUNNO', asked at MAIL, " in (
        done.stdout
    )
    assert "kept 30s idle" in done.stdout
    assert "policy services: none" in check_config(tmp_path).stdout


@pytest.mark.parametrize(
    ("args", "toml", "message"),
    [
        (("--policy", "127.0.0.1:10040"), "", "expected inet:HOST:PORT or unix:PATH"),
        (("--policy", "inet:h:1", "--policy-timeout", "0"), "", "timeout must be positive"),
        (("--policy", "inet:h:1", "--policy-default-action", "HOLD"), "", "default action"),
        ((), '[[policy]]\nservice = "inet:h:1"\ncolour = "red"\n', "unknown setting 'colour'"),
        ((), "[[policy]]\ntimeout = 3\n", "[[policy]] needs service"),
        ((), '[[policy]]\nservice = "inet:h:1"\nat_mail = "no"\n', "at_mail must be true or"),
        ((), '[[policy]]\nservice = "inet:h:1"\ntimeout = "soon"\n', "timeout must be a number"),
    ],
)
def test_bad_policy_configuration_is_one_line_and_exit_2(
    tmp_path: Path, args: tuple[str, ...], toml: str, message: str
) -> None:
    if toml:
        config = tmp_path / "ofmipd.toml"
        config.write_text(toml)
        args = (*args, "--config", str(config))
    done = check_config(tmp_path, *args)
    assert done.returncode == 2
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_a_reload_keeps_the_connection_unless_the_services_changed(
    tmp_path: Path, users: Path, capture: Path
) -> None:
    with ScriptedPolicy(dunno) as first, ScriptedPolicy(action("REJECT second")) as second:
        config = tmp_path / "ofmipd.toml"
        config.write_text(f'policy = "{first.service}"\n')
        with start_daemon(tmp_path, users, capture, "-L", "--config", str(config)) as daemon:
            assert send(login(daemon), SENDER, RCPT)[0] == 250
            daemon.proc.send_signal(signal.SIGHUP)
            daemon.wait_for_log("configuration reloaded")
            assert send(login(daemon), SENDER, RCPT)[0] == 250
            assert first.connections == 1  # kept across the reload
            config.write_text(f'policy = "{second.service}"\n')
            daemon.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while daemon.log_text().count("configuration reloaded") < 2:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert send(login(daemon), SENDER, RCPT) == (554, b"5.7.1 second")


def test_one_session_mode_asks_with_the_launchers_client(tmp_path: Path, capture: Path) -> None:
    """ofmipd -1 under tcpserver: the client comes from the environment, a refusal at
    END-OF-MESSAGE is the reply, and the process ends cleanly."""

    def answer(request: Request) -> bytes:
        if request["protocol_state"] == "END-OF-MESSAGE":
            return b"action=DEFER 4.7.1 later please\n\n"
        return b"action=DUNNO\n\n"

    users = authfile(tmp_path, "alice:secret\n")
    commands = [b"EHLO client.test", b"AUTH PLAIN AGFsaWNlAHNlY3JldA==",
                b"MAIL FROM:<alice@example.org>", b"RCPT TO:<bob@example.net>", b"DATA",
                b"Subject: x\r\n\r\nhi\r\n.", b"QUIT"]  # fmt: skip
    env = server_env(CAPTURE_DIR=str(capture), TCPREMOTEIP="192.0.2.7", TCPREMOTEPORT="5555",
                     TCPLOCALIP="192.0.2.1", TCPLOCALPORT="587", PROTO="TCP")  # fmt: skip
    with ScriptedPolicy(answer) as policy:
        args = ("-1", "-a", str(users), "--sendmail", CAPTURE, "--policy", policy.service,
                "--no-reverse-dns")  # fmt: skip
        proc = subprocess.Popen(
            ofmipd_command(*args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=env,
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        replies = []
        for command in [None, *commands]:  # the banner, then one reply per command
            if command is not None:
                proc.stdin.write(command + b"\r\n")
                proc.stdin.flush()
            while True:
                line = proc.stdout.readline()
                replies.append(line)
                if line[3:4] != b"-":
                    break
        assert proc.wait(20) == 0
    assert b"450 4.7.1 later please\r\n" in replies
    assert captured_messages(capture) == []
    rcpt = policy.requests[0]
    assert (rcpt["client_address"], rcpt["client_port"]) == ("192.0.2.7", "5555")
    assert (rcpt["server_address"], rcpt["server_port"]) == ("192.0.2.1", "587")
    assert rcpt["client_name"] == "unknown"


def test_a_refused_recipients_prepend_is_not_added(
    tmp_path: Path, users: Path, capture: Path
) -> None:
    def first_answer(request: Request) -> bytes:
        if request["protocol_state"] == "RCPT":
            return f"action=PREPEND X-For: {request['recipient']}\n\n".encode()
        return b"action=DUNNO\n\n"

    def second_answer(request: Request) -> bytes:
        if request["recipient"] == "no@example.net":
            return b"action=REJECT not this one\n\n"
        return b"action=DUNNO\n\n"

    with ScriptedPolicy(first_answer) as first, ScriptedPolicy(second_answer) as second:
        args = ("--policy", first.service, "--policy", second.service)
        with start_daemon(tmp_path, users, capture, *args) as daemon:
            smtp = login(daemon)
            smtp.mail(SENDER)
            assert smtp.rcpt("no@example.net")[0] == 554
            assert smtp.rcpt(RCPT)[0] == 250
            assert smtp.data(b"Subject: t\r\n\r\nhi\r\n")[0] == 250
            smtp.quit()
    ((_, message),) = captured_messages(capture)
    assert message.startswith(f"X-For: {RCPT}\r\nReceived: ".encode())


def test_a_policy_refusal_reserves_no_quota(tmp_path: Path, users: Path, capture: Path) -> None:
    """Policy and quotas together: the policy is asked first, so the recipients it
    refuses never take a unit of a recipient quota."""

    def refuse_no(request: Request) -> bytes:
        refused = request.get("recipient", "").startswith("no-")
        return b"action=REJECT not here\n\n" if refused else b"action=DUNNO\n\n"

    with ScriptedPolicy(refuse_no) as policy:
        args = ("--policy", policy.service, "--quota", "user-recipients:2/1h")
        with start_daemon(tmp_path, users, capture, "-L", *args) as daemon:
            smtp = login(daemon)
            assert smtp.mail(SENDER)[0] == 250
            assert [smtp.rcpt(f"no-{n}@example.net")[0] for n in range(3)] == [554] * 3
            assert [smtp.rcpt(f"ok{n}@example.net")[0] for n in range(3)] == [250, 250, 452]
            assert smtp.data(b"Subject: t\r\n\r\nhi\r\n")[0] == 250
            smtp.quit()
    [(_, message)] = captured_messages(capture)
    assert b"Subject: t" in message
