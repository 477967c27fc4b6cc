"""-R imap://, pop3:// and apop:// never send a password in cleartext unless told to.

Real parts: a Dovecot that offers STARTTLS/STLS and refuses cleartext logins (so only an
upgraded login can succeed, and its log says TLS); a Dovecot without TLS on a
non-loopback address (192.0.2.117, added to lo for the test); a man in the middle that
strips STARTTLS from a real Dovecot's capabilities. Stand-ins: a server that answers OK to
any password, Exchange-style greetings without [CAPABILITY], a server that injects
answers in cleartext after agreeing to STARTTLS.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from auth_backends import BackendSpec, create
from ofmipd.auth import Outcome, Secret, Verdict
from ofmipd.identity import ClientIdentity
from tests.dovecot_server import Dovecot
from tests.ofmipd_server import Daemon, ofmipd_command, server_env
from tests.ports import free_port
from tests.remote_standin import Peer, Script, Standin, server_tls_context, verify_url

SCHEMES = ("imap", "pop3", "apop")
PASSWORD = "S3cret!pw"
USERS = {"alice": PASSWORD}
NON_LOOPBACK = "192.0.2.117"  # TEST-NET-1, on lo only while a test needs it


def verify(url: str, client: ClientIdentity, password: str = PASSWORD) -> Outcome:
    return asyncio.run(verify_url(url, "alice", password, client))


@pytest.fixture
def non_loopback() -> Iterator[str]:
    """A local address that is not loopback, so one machine can be a "remote" server.
    Tests using it are marked root: it is machine-wide state."""
    add = ["ip", "addr", "add", f"{NON_LOOPBACK}/32", "dev", "lo"]
    added = subprocess.run(add, capture_output=True).returncode == 0
    try:
        yield NON_LOOPBACK
    finally:
        if added:
            subprocess.run(["ip", "addr", "del", f"{NON_LOOPBACK}/32", "dev", "lo"], check=True)


# -- a real Dovecot that only an upgraded login gets into ----------------------------------


@pytest.mark.slow
def test_starttls_upgrade_is_the_only_way_into_a_dovecot_refusing_cleartext(
    client: ClientIdentity,
) -> None:
    # Connections from 127.0.0.1 to 127.0.0.5 are not "secured" for Dovecot, so with
    # disable_plaintext_auth it advertises LOGINDISABLED (IMAP) and no USER (POP3) until
    # TLS: an ACCEPT proves the upgrade, and that capabilities were learned again after it.
    with Dovecot(
        USERS, addresses=("127.0.0.5",), extra_config="disable_plaintext_auth = yes\n"
    ) as server:
        trusted = f"ca_file={server.cert_file}"
        for scheme in SCHEMES:
            good = verify(f"{server.url(scheme)}?{trusted}", client)
            assert good.verdict is Verdict.ACCEPT, (scheme, good)
            wrong = verify(f"{server.url(scheme)}?{trusted}", client, "wrong")
            assert wrong.verdict is Verdict.REJECT, (scheme, wrong)
            # The same upgrade with a certificate nobody vouched for: no password sent.
            untrusted = verify(server.url(scheme), client)
            assert untrusted.verdict is Verdict.TEMPFAIL, (scheme, untrusted)
            assert "certificate not trusted" in untrusted.reason
            assert untrusted.reason.endswith("ca_file names a CA to trust, tls=none skips STARTTLS")
        logins = [line for line in server.logs().splitlines() if "Login: user=<alice>" in line]
        assert len(logins) == 3, server.logs()
        assert all(", TLS" in line for line in logins), logins
        methods = sorted(line.split("method=")[1].split(",")[0] for line in logins)
        assert methods == ["APOP", "PLAIN", "PLAIN"]
        failed = [line for line in server.logs().splitlines() if "auth failed" in line]
        assert failed and all(", TLS" in line for line in failed)


# -- a server without STARTTLS on a non-loopback address -----------------------------------


@pytest.mark.root
@pytest.mark.slow
def test_no_starttls_off_loopback_means_no_password_unless_tls_none(
    non_loopback: str, client: ClientIdentity
) -> None:
    with Dovecot(USERS, addresses=(non_loopback,), tls=False) as server:
        for scheme in SCHEMES:
            outcome = verify(server.url(scheme), client)
            assert outcome.verdict is Verdict.TEMPFAIL, (scheme, outcome)
            assert "add tls=none" in outcome.reason
            assert ("STARTTLS" if scheme == "imap" else "STLS") in outcome.reason
        assert "user=<alice>" not in server.logs()
        # The admin's explicit opt-in: the same logins work, in cleartext.
        for scheme in SCHEMES:
            opted_in = verify(server.url(scheme) + "?tls=none", client)
            assert opted_in.verdict is Verdict.ACCEPT, (scheme, opted_in)
        logins = [line for line in server.logs().splitlines() if "Login: user=<alice>" in line]
        assert len(logins) == 3 and not any("TLS" in line for line in logins)


def yes_man(imap: bool) -> Script:
    """A man in the middle: no STARTTLS, and OK to any password."""

    async def script(peer: Peer) -> None:
        await peer.send(b"* OK [CAPABILITY IMAP4rev1] hi\r\n" if imap else b"+OK hi <1.2@mitm>\r\n")
        while line := await peer.line():
            tag = line.split(b" ", 1)[0]
            if line.endswith((b"LOGOUT", b"QUIT")):
                return
            if not imap:
                await peer.send(b"+OK\r\nUSER\r\n.\r\n" if line == b"CAPA" else b"+OK\r\n")
            elif line.endswith(b"CAPABILITY"):
                await peer.send(b"* CAPABILITY IMAP4rev1\r\n" + tag + b" OK\r\n")
            else:
                await peer.send(tag + b" OK welcome\r\n")

    return script


@pytest.mark.root
@pytest.mark.slow
def test_man_in_the_middle_saying_yes_off_loopback_gets_no_password(
    non_loopback: str, client: ClientIdentity
) -> None:
    async def run(scheme: str, query: str = "") -> tuple[Outcome, bytes]:
        async with Standin(yes_man(scheme == "imap"), host=non_loopback) as mitm:
            outcome = await verify_url(mitm.url(scheme, query), "alice", PASSWORD, client)
        return outcome, bytes(mitm.received)

    for scheme in SCHEMES:
        outcome, received = asyncio.run(run(scheme))
        assert outcome.verdict is Verdict.TEMPFAIL, (scheme, outcome)
        assert "tls=none" in outcome.reason
        assert PASSWORD.encode() not in received and b"alice" not in received, received
        # tls=none is what it says: the man in the middle gets the password (and says yes).
        outcome, received = asyncio.run(run(scheme, "tls=none"))
        assert outcome.verdict is Verdict.ACCEPT
        assert (PASSWORD.encode() in received) is (scheme != "apop")


def stripping_starttls(upstream: tuple[str, int]) -> Script:
    """A man in the middle: relays to the real server, hiding STARTTLS and STLS; what the
    client sends is recorded as a stand-in's `received`."""

    async def script(peer: Peer) -> None:
        reader, writer = await asyncio.open_connection(*upstream)

        async def down() -> None:
            while line := await reader.readline():
                if line.rstrip(b"\r\n").upper() != b"STLS":
                    await peer.send(line.replace(b" STARTTLS", b""))

        async def up() -> None:
            try:
                while data := await peer.reader.read(4096):
                    peer.received += data
                    writer.write(data)
                    await writer.drain()
            finally:
                writer.close()  # the server hangs up in turn, which ends down()

        await asyncio.gather(down(), up(), return_exceptions=True)

    return script


@pytest.mark.root
@pytest.mark.slow
def test_starttls_stripped_by_a_man_in_the_middle_gets_no_password(
    non_loopback: str, client: ClientIdentity
) -> None:
    with Dovecot(USERS) as server:  # offers STARTTLS and STLS on 127.0.0.1

        async def through_mitm(scheme: str, host: str, query: str = "") -> tuple[Outcome, bytes]:
            proto = {"apop": "pop3"}.get(scheme, scheme)
            upstream = (server.host, server.ports[proto])
            async with Standin(stripping_starttls(upstream), host=host) as mitm:
                outcome = await verify_url(mitm.url(scheme, query), "alice", PASSWORD, client)
            return outcome, bytes(mitm.received)

        for scheme in SCHEMES:
            # Off loopback, the default (auto) will not fall back to cleartext.
            outcome, forwarded = asyncio.run(through_mitm(scheme, non_loopback))
            assert outcome.verdict is Verdict.TEMPFAIL, (scheme, outcome)
            assert "add tls=none" in outcome.reason
            assert b"alice" not in forwarded, forwarded
            # On loopback too, when the admin said tls=starttls.
            outcome, forwarded = asyncio.run(through_mitm(scheme, "127.0.0.1", "tls=starttls"))
            assert outcome.verdict is Verdict.TEMPFAIL, (scheme, outcome)
            assert "tls=starttls requires it" in outcome.reason
            assert b"alice" not in forwarded, forwarded
        # Without the man in the middle the default upgrades and logs in.
        trusted = f"ca_file={server.cert_file}"
        for scheme in SCHEMES:
            assert verify(f"{server.url(scheme)}?{trusted}", client).verdict is Verdict.ACCEPT


@pytest.mark.root
@pytest.mark.slow
def test_ipauthmap_applies_the_loopback_rule_to_the_chosen_server(
    non_loopback: str, tmp_path: Path, client: ClientIdentity
) -> None:
    with Dovecot(USERS, addresses=("127.0.0.1", non_loopback), tls=False) as server:
        port = server.ports["imap"]
        ipmap = tmp_path / "ipauthmap"
        ipmap.write_text(f"127.0.0.2 127.0.0.1 {port}\n127.0.0.3 {non_loopback} {port}\n")
        backend = create(BackendSpec(kind="imap", arg=f"imap://0.0.0.0?ipauthmap={ipmap}"))

        def via(local_ip: str) -> Outcome:
            at = client._replace(local_ip=local_ip)
            return asyncio.run(backend.verify("alice", Secret(PASSWORD.encode()), at))

        assert via("127.0.0.2").verdict is Verdict.ACCEPT  # loopback: cleartext allowed
        far = via("127.0.0.3")
        assert far.verdict is Verdict.TEMPFAIL and "add tls=none" in far.reason, far
        assert far.reason.startswith(f"{non_loopback}:{port}: ")


# -- what IMAP learns before LOGIN (stand-ins) ----------------------------------------------


def exchange_style(
    capabilities: bytes, after_tls: bytes = b"", tls_context: ssl.SSLContext | None = None
) -> Script:
    """A greeting without [CAPABILITY]; CAPABILITY answers `capabilities`, and after
    STARTTLS `after_tls`. A marker in the record shows where TLS began."""

    async def script(peer: Peer) -> None:
        await peer.send(b"* OK The Microsoft Exchange IMAP4 service is ready.\r\n")
        offered = capabilities
        while line := await peer.line():
            tag, _, command = line.partition(b" ")
            if command == b"CAPABILITY":
                await peer.send(b"* CAPABILITY " + offered + b"\r\n" + tag + b" OK done\r\n")
            elif command == b"STARTTLS":
                await peer.send(tag + b" OK Begin TLS negotiation now\r\n")
                assert tls_context is not None
                await peer.start_tls(tls_context)
                peer.received += b"--TLS--"
                offered = after_tls
            elif command.startswith(b"LOGIN"):
                await peer.send(tag + b" OK LOGIN completed\r\n")
            elif command == b"LOGOUT":
                return
            else:
                await peer.send(tag + b" BAD\r\n")

    return script


def run_standin(script: Script, url_query: str, client: ClientIdentity) -> tuple[Outcome, bytes]:
    async def run() -> tuple[Outcome, bytes]:
        async with Standin(script) as server:
            outcome = await verify_url(server.url("imap", url_query), "alice", PASSWORD, client)
        return outcome, bytes(server.received)

    return asyncio.run(run())


def test_capabilities_are_asked_when_the_greeting_has_none(client: ClientIdentity) -> None:
    outcome, received = run_standin(exchange_style(b"IMAP4 IMAP4rev1 AUTH=PLAIN"), "", client)
    assert outcome.verdict is Verdict.ACCEPT, outcome
    assert received.startswith(b"c1 CAPABILITY\r\na1 LOGIN"), received


def test_logindisabled_learned_by_asking_is_honoured(client: ClientIdentity) -> None:
    script = exchange_style(b"IMAP4 IMAP4rev1 LOGINDISABLED AUTH=GSSAPI")
    outcome, received = run_standin(script, "", client)
    assert outcome.verdict is Verdict.TEMPFAIL
    assert "LOGINDISABLED" in outcome.reason
    assert b"LOGIN " not in received and PASSWORD.encode() not in received, received


def test_logindisabled_before_tls_upgrades_and_looks_again(
    tmp_path: Path, client: ClientIdentity
) -> None:
    context = server_tls_context(tmp_path)
    before = b"IMAP4rev1 STARTTLS LOGINDISABLED"
    script = exchange_style(before, after_tls=b"IMAP4rev1 AUTH=PLAIN", tls_context=context)
    outcome, received = run_standin(script, f"ca_file={tmp_path / 'cert.pem'}", client)
    assert outcome.verdict is Verdict.ACCEPT, outcome
    clear, _, secure = received.partition(b"--TLS--")
    assert clear == b"c1 CAPABILITY\r\ns1 STARTTLS\r\n"
    assert secure.startswith(b"c2 CAPABILITY\r\na1 LOGIN"), secure
    # What counts is the list learned over TLS: LOGINDISABLED there means no LOGIN.
    script = exchange_style(b"IMAP4rev1 STARTTLS", b"IMAP4rev1 LOGINDISABLED", context)
    outcome, received = run_standin(script, f"ca_file={tmp_path / 'cert.pem'}", client)
    assert outcome.verdict is Verdict.TEMPFAIL and "LOGINDISABLED over TLS" in outcome.reason
    assert PASSWORD.encode() not in received


def test_tls_starttls_requires_the_upgrade_on_loopback_too(client: ClientIdentity) -> None:
    script = exchange_style(b"IMAP4rev1 AUTH=PLAIN")
    outcome, received = run_standin(script, "tls=starttls", client)
    assert outcome.verdict is Verdict.TEMPFAIL
    assert outcome.reason.endswith("server does not offer STARTTLS, and tls=starttls requires it")
    assert PASSWORD.encode() not in received


def test_cleartext_injected_after_starttls_go_ahead_is_refused(client: ClientIdentity) -> None:
    # CVE-2011-0411's pattern: answers sent in cleartext with the go-ahead would be read
    # as if they had come through TLS.
    async def injector(peer: Peer) -> None:
        await peer.send(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n")
        await peer.line()
        await peer.send(b"s1 OK go ahead\r\n* CAPABILITY IMAP4rev1\r\nc2 OK\r\na1 OK\r\n")
        await peer.line()

    outcome, received = run_standin(injector, "", client)
    assert outcome.verdict is Verdict.TEMPFAIL
    assert outcome.reason.endswith("server sent data after agreeing to start TLS")
    assert PASSWORD.encode() not in received


def test_starttls_refused_sends_no_password(client: ClientIdentity) -> None:
    async def refuser(peer: Peer) -> None:
        await peer.send(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n")
        await peer.line()
        await peer.send(b"s1 NO [UNAVAILABLE] no TLS today\r\n")
        await peer.line()

    outcome, received = run_standin(refuser, "", client)
    assert outcome.verdict is Verdict.TEMPFAIL
    assert "IMAP NO [UNAVAILABLE] to STARTTLS; the password is not sent" in outcome.reason
    assert received == b"s1 STARTTLS\r\n"  # and nothing after it


# -- tls=none is the admin's explicit choice, and said so ----------------------------------


def test_tls_none_is_a_warning_at_start_and_in_check_config(tmp_path: Path) -> None:
    url = f"imap://127.0.0.1:{free_port()}?tls=none"
    checked = subprocess.run(
        [*ofmipd_command("--check-config", "-R", url)],
        capture_output=True, text=True, env=server_env(), timeout=60,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    assert f"warning: -R {url}: tls=none: users' passwords go to the server in cleartext" in (
        checked.stdout
    )
    line = checked.stdout.split("authenticators (in order):")[1].splitlines()[1]
    assert line.endswith(" tls=none (passwords in CLEARTEXT)"), line
    for shown, transport in [
        ("imap://127.0.0.1", "STARTTLS if offered, else in cleartext to loopback"),
        ("pop3://mail.example.org", "STARTTLS, required at login"),
        ("imaps://mail.example.org", "passwords over TLS"),
    ]:
        default = subprocess.run(
            [*ofmipd_command("--check-config", "-R", shown)],
            capture_output=True, text=True, env=server_env(), timeout=60,
        )  # fmt: skip
        assert default.returncode == 0 and "warning" not in default.stdout, default.stdout
        assert f"{transport})\n" in default.stdout, default.stdout
    port = free_port()
    with Daemon(["-p", f"127.0.0.1:{port}", "-R", url, "--sendmail", "/bin/true"], port, tmp_path):
        pass
    log = (tmp_path / f"ofmipd-{port}.log").read_text()
    assert "WARNING" in log and "tls=none: users' passwords go to the server in cleartext" in log


def test_bad_tls_setting_is_one_line_and_exit_2() -> None:
    for url, complaint in [
        ("imap://h?tls=yes", "tls must be auto, starttls or none, not 'yes'"),
        ("pop3s://h?tls=none", "pop3s:// is TLS from the start"),
    ]:
        done = subprocess.run(
            [*ofmipd_command("--check-config", "-R", url)],
            capture_output=True, text=True, env=server_env(), timeout=60,
        )  # fmt: skip
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1 and complaint in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_tls_is_a_toml_key_too() -> None:
    backend = create(BackendSpec(kind="pop3", options={"url": "apop://h", "tls": "starttls"}))
    assert backend.target == "apop://h:110 tls=starttls"
    assert backend.transport == "passwords over STARTTLS, required at login"
    # the table's own setting wins over the URL's query, as for every remote option
    both = create(BackendSpec(kind="imap", options={"url": "imap://h?tls=none", "tls": "auto"}))
    assert both.target == "imap://h:143"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.9.8.7", True), ("::1", True), ("::ffff:127.0.0.2", True),
     ("192.0.2.117", False), ("::ffff:192.0.2.1", False), ("10.0.0.1", False),
     ("localhost.example.org", False), ("", False)],
)  # fmt: skip
def test_loopback_is_an_address_test(host: str, loopback: bool) -> None:
    from auth_backends.remote import is_loopback

    assert is_loopback(host) is loopback
