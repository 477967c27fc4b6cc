"""SCRAM-SHA-256, SCRAM-SHA-1 and SCRAM-SHA-256-PLUS: a real daemon over an authfile, with
scramp's client for the edge cases and the real msmtp (GNU SASL) for interoperability."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import smtplib
import ssl
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scramp import ScramClient

from ofmipd import mechanisms
from ofmipd.auth import Chain, ScramKeys, Verdict, accept, reject
from ofmipd.identity import ClientIdentity
from tests.ofmipd_server import authfile, captured_messages, start_daemon
from tests.tls_support import client_context, make_certificate

PASSWORD = "Corr3ct-Horse"
MESSAGE = b"From: alice@example.org\r\nSubject: scram\r\n\r\nbody\r\n"


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def unb64(text: str | bytes) -> str:
    return base64.b64decode(text).decode()


@pytest.fixture
def users(tmp_path: Path) -> Path:
    return authfile(tmp_path, f"alice:{PASSWORD}\n")


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    return make_certificate(tmp_path)


def tls_args(cert: tuple[Path, Path]) -> tuple[str, ...]:
    return ("--ratelimit", "off", "--ssl-cert", str(cert[0]), "--ssl-key", str(cert[1]),
            "--tls", "optional")  # fmt: skip


def smtp(daemon) -> smtplib.SMTP:
    s = smtplib.SMTP(daemon.host, daemon.port, local_hostname="client.test", timeout=20)
    s.ehlo()
    return s


def starttls(daemon, cert: tuple[Path, Path]) -> smtplib.SMTP:
    s = smtp(daemon)
    s.starttls(context=client_context(cert[0]))
    s.ehlo()
    return s


def scram_login(
    s: smtplib.SMTP, client: ScramClient, mechanism: str, *, initial: bool = False
) -> tuple[int, bytes]:
    """One exchange; the last reply (the 235 holds the server-final, checked here)."""
    first = b64(client.get_client_first())
    code, text = s.docmd("AUTH", f"{mechanism} {first}" if initial else mechanism)
    if not initial:
        assert (code, text) == (334, b"")
        code, text = s.docmd(first)
    assert code == 334, text
    client.set_server_first(unb64(text))
    code, text = s.docmd(b64(client.get_client_final()))
    if code == 334:  # the default: server-final in a last 334
        client.set_server_final(unb64(text))
        code, text = s.docmd("")
    elif code == 235:  # --scram-final 235
        client.set_server_final(unb64(text))  # proves the server knew the keys
    return code, text


def test_ehlo_offers_scram_over_an_authfile_but_plus_only_with_tls(tmp_path, users, capture, cert):
    args = tls_args(cert)
    with start_daemon(tmp_path, users, capture, *args) as daemon:
        with smtp(daemon) as s:
            assert s.esmtp_features["auth"].split() == [
                "PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256",
            ]  # fmt: skip
            assert s.docmd("AUTH", "SCRAM-SHA-256-PLUS")[0] == 504
        with starttls(daemon, cert) as s:
            assert "SCRAM-SHA-256-PLUS" in s.esmtp_features["auth"].split()


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
@pytest.mark.parametrize("initial", [False, True])
def test_scram_logs_in_with_server_final_in_the_235(tmp_path, users, capture, mechanism, initial):
    args = ("--ratelimit", "off", "--scram-final", "235")
    with start_daemon(tmp_path, users, capture, *args) as daemon:
        with smtp(daemon) as s:
            client = ScramClient([mechanism], "alice", PASSWORD)
            code, _ = scram_login(s, client, mechanism, initial=initial)
            assert code == 235
            s.sendmail("alice@example.org", ["bob@example.net"], MESSAGE)
        assert len(captured_messages(capture)) == 1
        log = daemon.log_text()
    assert f"auth accept: client=127.0.0.1 user=alice mechanism={mechanism}" in log
    assert f"{mechanism} proof matches" in log


def test_scram_session_takes_the_stores_name_as_plain_does(tmp_path, users, capture):
    """The authfile matches names regardless of case; whichever mechanism logs ALICE in,
    the session (log, LOGIN) is the file's alice."""
    with start_daemon(tmp_path, users, capture, "--ratelimit", "off") as daemon:
        for mechanism in ("SCRAM-SHA-256", "PLAIN"):
            with smtp(daemon) as s:
                if mechanism == "PLAIN":
                    assert (
                        s.docmd("AUTH", f"PLAIN {b64(chr(0) + 'ALICE' + chr(0) + PASSWORD)}")[0]
                        == 235
                    )
                else:
                    client = ScramClient([mechanism], "ALICE", PASSWORD)
                    assert scram_login(s, client, mechanism)[0] == 235
                s.sendmail("alice@example.org", ["bob@example.net"], MESSAGE)
        log = daemon.log_text()
    for mechanism in ("SCRAM-SHA-256", "PLAIN"):
        assert f"auth accept: client=127.0.0.1 user=alice mechanism={mechanism} " in log
    assert "user=ALICE" not in log
    envs = [env for env, _ in captured_messages(capture)]
    assert len(envs) == 2 and all("LOGIN=alice\n" in env for env in envs), envs


def test_scram_final_in_a_last_334_by_default(tmp_path, users, capture):
    with start_daemon(tmp_path, users, capture, "--ratelimit", "off") as daemon, smtp(daemon) as s:
        client = ScramClient(["SCRAM-SHA-256"], "alice", PASSWORD)
        first = b64(client.get_client_first())
        code, text = s.docmd("AUTH", f"SCRAM-SHA-256 {first}")
        client.set_server_first(unb64(text))
        code, text = s.docmd(b64(client.get_client_final()))
        assert code == 334
        client.set_server_final(unb64(text))
        assert s.docmd("")[0] == 235


def test_wrong_password_is_535_and_no_payload_is_logged(tmp_path, users, capture):
    with start_daemon(tmp_path, users, capture, "--ratelimit", "off", "-d") as daemon:
        with smtp(daemon) as s:
            client = ScramClient(["SCRAM-SHA-256"], "alice", "wrong")
            first = b64(client.get_client_first())
            _, text = s.docmd("AUTH", f"SCRAM-SHA-256 {first}")
            client.set_server_first(unb64(text))
            final = b64(client.get_client_final())
            assert s.docmd(final)[0] == 535
        log = daemon.log_text()
    assert "auth reject: client=127.0.0.1 user=alice mechanism=SCRAM-SHA-256" in log
    assert "proof mismatch" in log
    for payload in (first, final, text.decode()):
        assert payload not in log


def test_unknown_user_gets_a_server_first_and_then_535(tmp_path, users, capture):
    with start_daemon(tmp_path, users, capture, "--ratelimit", "off") as daemon:
        with smtp(daemon) as s:
            salts = []
            for _ in range(2):
                client = ScramClient(["SCRAM-SHA-256"], "mallory", PASSWORD)
                _, text = s.docmd("AUTH", f"SCRAM-SHA-256 {b64(client.get_client_first())}")
                client.set_server_first(unb64(text))  # a well-formed challenge
                salts.append(unb64(text).split(",")[1])
                assert s.docmd(b64(client.get_client_final()))[0] == 535
        assert salts[0] == salts[1]  # a fake salt that changed would give the user away
        assert "no such user in" in daemon.log_text()


def test_cancel_empty_and_long_lines_behave_as_for_other_mechanisms(tmp_path, users, capture):
    with start_daemon(tmp_path, users, capture, "--ratelimit", "off") as daemon, smtp(daemon) as s:
        assert s.docmd("AUTH", "SCRAM-SHA-256")[0] == 334
        assert s.docmd("*") == (501, b"5.7.0 Authentication cancelled")
        client = ScramClient(["SCRAM-SHA-256"], "alice", PASSWORD)
        s.docmd("AUTH", f"SCRAM-SHA-256 {b64(client.get_client_first())}")
        assert s.docmd("*") == (501, b"5.7.0 Authentication cancelled")  # after server-first
        assert s.docmd("AUTH", "SCRAM-SHA-256 =")[0] == 501  # empty client-first
        assert s.docmd("AUTH", "SCRAM-SHA-256")[0] == 334
        assert s.docmd("A" * 20000)[0] == 500
        assert s.docmd("AUTH", f"SCRAM-SHA-256 {b64('n,,x=alice,r=abc')}")[0] == 501
        for last, reply in (("*", 501), (b64("junk"), 535)):  # answers to the final 334
            client = ScramClient(["SCRAM-SHA-256"], "alice", PASSWORD)
            _, text = s.docmd("AUTH", f"SCRAM-SHA-256 {b64(client.get_client_first())}")
            client.set_server_first(unb64(text))
            assert s.docmd(b64(client.get_client_final()))[0] == 334
            assert s.docmd(last)[0] == reply
        code, _ = scram_login(s, ScramClient(["SCRAM-SHA-256"], "alice", PASSWORD), "SCRAM-SHA-256")
        assert code == 235  # the session is still usable


def end_point(cert: Path) -> bytes:
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    return hashlib.sha256(der).digest()  # an ECDSA-with-SHA256 certificate


def test_plus_binds_to_the_tls_session(tmp_path, users, capture, cert):
    args = tls_args(cert)
    with start_daemon(tmp_path, users, capture, *args) as daemon:
        with starttls(daemon, cert) as s:
            binding = ("tls-server-end-point", s.sock)
            client = ScramClient(["SCRAM-SHA-256-PLUS"], "alice", PASSWORD, binding)
            assert scram_login(s, client, "SCRAM-SHA-256-PLUS")[0] == 235
        # The wrong certificate's hash: a man in the middle's session.
        with starttls(daemon, cert) as s:
            wrong = ("tls-server-end-point", hashlib.sha256(b"other").digest())
            client = ScramClient(["SCRAM-SHA-256-PLUS"], "alice", PASSWORD, wrong)
            _, text = s.docmd("AUTH", f"SCRAM-SHA-256-PLUS {b64(client.get_client_first())}")
            client.set_server_first(unb64(text))
            assert s.docmd(b64(client.get_client_final()))[0] == 535
        # A client that could bind ('y') but thinks we cannot: a downgrade, refused.
        with starttls(daemon, cert) as s:
            binding = ("tls-server-end-point", s.sock)
            client = ScramClient(["SCRAM-SHA-256"], "alice", PASSWORD, binding)
            first = client.get_client_first()
            assert first.startswith("y,,")
            assert s.docmd("AUTH", f"SCRAM-SHA-256 {b64(first)}")[0] == 535
        # tls-unique (undefined on TLS 1.3) is never done.
        with starttls(daemon, cert) as s:
            assert s.sock.version() == "TLSv1.3"
            first = f"p=tls-unique,,n=alice,r={'x' * 24}"
            assert s.docmd("AUTH", f"SCRAM-SHA-256-PLUS {b64(first)}")[0] == 535
        log = daemon.log_text()
    assert "auth accept: client=127.0.0.1 user=alice mechanism=SCRAM-SHA-256-PLUS" in log
    assert "channel binding data does not match this TLS session" in log
    assert "client did not bind the channel though -PLUS was offered" in log
    assert "unsupported channel binding (only tls-server-end-point)" in log


def test_binding_asked_for_without_tls_is_535(tmp_path, users, capture):
    with start_daemon(tmp_path, users, capture, "--ratelimit", "off") as daemon:
        with smtp(daemon) as s:
            first = f"p=tls-server-end-point,,n=alice,r={'x' * 24}"
            assert s.docmd("AUTH", f"SCRAM-SHA-256 {b64(first)}")[0] == 535
            # Without -PLUS on offer, 'y' is an honest client's answer.
            binding = ("tls-server-end-point", b"any")
            client = ScramClient(["SCRAM-SHA-256"], "alice", PASSWORD, binding)
            assert scram_login(s, client, "SCRAM-SHA-256")[0] == 235
        assert "client asked for channel binding without TLS" in daemon.log_text()


def test_scram_decisions_are_counted_like_any_other(tmp_path, users, capture):
    import urllib.request

    from tests.conftest import free_port

    port = free_port()
    args = ("--ratelimit", "off", "--metrics", f"127.0.0.1:{port}")
    with start_daemon(tmp_path, users, capture, *args) as daemon, smtp(daemon) as s:
        for password, code in ((PASSWORD, 235), ("wrong", 535)):
            client = ScramClient(["SCRAM-SHA-256"], "alice", password)
            assert scram_login(s, client, "SCRAM-SHA-256")[0] == code
            if code == 235:  # one login per session: start another for the wrong one
                s.close()
                s.connect(daemon.host, daemon.port)
                s.ehlo()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
            text = reply.read().decode()
    for verdict in ("accept", "reject"):
        line = f'ofmipd_auth_decisions_total{{mechanism="SCRAM-SHA-256",verdict="{verdict}"}} 1.0'
        assert line in text


# ---- the real msmtp (GNU SASL) -------------------------------------------------------


def test_msmtp_lists_scram():
    out = subprocess.run(["msmtp", "--version"], capture_output=True, text=True).stdout
    assert "scram-sha-256" in out


def msmtp(
    daemon, tmp_path: Path, auth: str, password: str, *tls: str
) -> subprocess.CompletedProcess:
    rc = tmp_path / "msmtprc"
    rc.write_text("")
    rc.chmod(0o600)
    return subprocess.run(
        ["msmtp", "-C", str(rc), f"--host={daemon.host}", f"--port={daemon.port}",
         f"--auth={auth}", "--user=alice", f"--passwordeval=echo {password}",
         "--from=alice@example.org", "--domain=client.test", *tls, "--", "bob@example.net"],
        input=MESSAGE, capture_output=True, timeout=60,
    )  # fmt: skip


def test_msmtp_logs_in_with_scram_sha_256_without_tls(tmp_path, users, capture):
    with start_daemon(tmp_path, users, capture, "--ratelimit", "off") as daemon:
        result = msmtp(daemon, tmp_path, "scram-sha-256", PASSWORD, "--tls=off")
        assert result.returncode == 0, result.stderr
        wrong = msmtp(daemon, tmp_path, "scram-sha-256", "nope", "--tls=off")
        assert wrong.returncode != 0 and b"535" in wrong.stderr
        log = daemon.log_text()
    assert len(captured_messages(capture)) == 1
    assert "mechanism=SCRAM-SHA-256 backend=authfile" in log


@pytest.mark.parametrize(
    "auth, mechanism",
    # With every mechanism on offer (SCRAM-SHA-256-PLUS too), `auth on` makes msmtp pick
    # PLAIN inside TLS; asked for SCRAM it must not be taken for a downgrade (it says 'n').
    [("scram-sha-256", "SCRAM-SHA-256"), ("on", "PLAIN")],
)
def test_msmtp_logs_in_over_starttls(tmp_path, users, capture, cert, auth, mechanism):
    tls = ("--tls=on", "--tls-starttls=on", f"--tls-trust-file={cert[0]}", "--tls-certcheck=off")
    with start_daemon(tmp_path, users, capture, *tls_args(cert)) as daemon:
        result = msmtp(daemon, tmp_path, auth, PASSWORD, *tls)
        assert result.returncode == 0, result.stderr
        wrong = msmtp(daemon, tmp_path, auth, "nope", *tls)
        assert wrong.returncode != 0 and b"535" in wrong.stderr
        log = daemon.log_text()
    assert f"auth accept: client=127.0.0.1 user=alice mechanism={mechanism} " in log
    assert f"auth reject: client=127.0.0.1 user=alice mechanism={mechanism} " in log


# ---- the chain, in-process -----------------------------------------------------------


class KeyStore:
    name = "keys"

    def __init__(self, keys: dict[str, list[ScramKeys]]) -> None:
        self.keys, self.target = keys, "memory"

    async def verify(self, user, secret, client):
        return reject("not used")

    async def scram_keys(self, user, mechanism, client):
        return self.keys.get(user) or reject(f"no such user {user}")


def keys_for(password: str, label: str | None) -> ScramKeys:
    from ofmipd.scram import derive_keys

    return derive_keys(password, "SHA-256", (label or "main").encode() * 4, label)


def test_chain_commits_to_the_main_credential_and_records_the_attempts():
    main, app = keys_for("main", None), keys_for("app", "phone")
    chain = Chain([KeyStore({}), KeyStore({"alice": [app, main]}), KeyStore({"alice": [app]})])
    assert chain.supports_scram
    seen = []

    async def prove(candidates):
        seen.append(list(candidates))
        return accept("proof matches"), (candidates[0] if candidates else None)

    client = ClientIdentity(ip="192.0.2.7")
    decision = asyncio.run(chain.authenticate_scram(b"alice", "SCRAM-SHA-256", client, prove))
    assert decision.verdict is Verdict.ACCEPT and seen == [[main]]  # app's salt differs
    assert [a.outcome.verdict for a in decision.attempts] == [Verdict.REJECT, Verdict.ACCEPT]

    seen.clear()
    decision = asyncio.run(chain.authenticate_scram(b"bob", "SCRAM-SHA-256", client, prove))
    assert decision.verdict is Verdict.REJECT and seen == [[]]  # a dummy exchange still ran
    assert decision.reason == "no such user bob"
    assert not Chain([KeyStore({}), object()]).supports_scram  # type: ignore[list-item]


def test_chain_holds_scram_names_to_the_door_rules_and_records_app_password_use():
    bad = keys_for("app", "phone")._replace(user="alice\nroot")
    used = []

    class Recorder(KeyStore):
        async def record_use(self, user, label, client):
            used.append((user, label, client.ip))

    async def prove(candidates):
        return accept("proof matches", candidates[0].user), candidates[0]

    client = ClientIdentity(ip="192.0.2.7")
    chain = Chain([Recorder({"alice": [bad]})])
    decision = asyncio.run(chain.authenticate_scram(b"alice", "SCRAM-SHA-256", client, prove))
    assert decision.verdict is Verdict.TEMPFAIL and "canonical name is unusable" in decision.reason
    assert used == []
    good = keys_for("app", "phone")._replace(user="alice")
    chain = Chain([Recorder({"ALICE": [good]})])
    decision = asyncio.run(chain.authenticate_scram(b"ALICE", "SCRAM-SHA-256", client, prove))
    assert decision.verdict is Verdict.ACCEPT and decision.user == "alice"
    assert used == [("alice", "phone", "192.0.2.7")]


def test_authtest_decides_a_scram_login_like_the_server(tmp_path, users):
    from tests.test_authtest import authtest

    code, out, _ = authtest(
        "-a", str(users), "--mechanism", "scram-sha-256", "alice", password=PASSWORD
    )
    assert code == 0 and "SCRAM-SHA-256 proof matches" in out, out
    code, out, _ = authtest(
        "-a", str(users), "--mechanism", "SCRAM-SHA-1", "alice", password="wrong-one"
    )
    assert code == 1 and "SCRAM-SHA-1: proof mismatch" in out, out
    code, out, _ = authtest(
        "-a", str(users), "--mechanism", "SCRAM-SHA-256", "nobody", password=PASSWORD
    )
    assert code == 1 and "no such user in" in out, out


@given(st.binary(max_size=300))
def test_client_first_parser_raises_only_malformed_response(blob):
    try:
        first = mechanisms.parse_scram_first(blob)
    except mechanisms.MalformedResponse:
        return
    assert first.message.encode() == blob


def test_client_first_parser_unescapes_the_name():
    first = mechanisms.parse_scram_first(b"n,,n=a=2Cb=3Dc,r=abc")
    assert first.user == b"a,b=c"
    with pytest.raises(mechanisms.MalformedResponse):
        mechanisms.parse_scram_first(b"n,,n=a=b,r=abc")


# ---- the salt before any proof does not say who exists ------------------------------------


def salt_shown(args: list[str], env: dict[str, str], user: str, mechanism: str) -> bytes:
    """The salt of the server-first message one `ofmipd -1` process shows for `user`."""
    from tests.ofmipd_server import ofmipd_command

    client_first = f"n,,n={user},r=fyko+d2lbbFgONRv9qkxdawL"
    proc = subprocess.Popen(
        ofmipd_command("-1", *args), stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:

        def reply() -> bytes:
            while True:
                line = proc.stdout.readline()
                assert line, "ofmipd closed the session"
                if line[3:4] == b" ":
                    return line.rstrip(b"\r\n")

        reply()  # the greeting
        for command in ("EHLO probe.test", f"AUTH {mechanism} {b64(client_first)}"):
            proc.stdin.write(command.encode() + b"\r\n")
            proc.stdin.flush()
            answer = reply()
        assert answer.startswith(b"334 "), answer
        server_first = dict(
            part.split("=", 1) for part in unb64(answer[4:]).split(",") if "=" in part
        )
        proc.stdin.write(b"*\r\nQUIT\r\n")
        proc.stdin.flush()
        return base64.b64decode(server_first["s"])
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_salts_do_not_tell_known_from_unknown_names_across_processes(tmp_path: Path) -> None:
    from tests.ofmipd_server import CAPTURE, server_env

    users = authfile(tmp_path, "alice:s3cret\n")
    passwd = tmp_path / "passwd"
    passwd.write_text("bob:{PLAIN}s3cret\n")
    passwd.chmod(0o600)
    env = server_env()  # one state directory for every process, as under tcpserver
    for args, known in (
        (["-a", str(users)], "alice"),
        (["--passwd-file", str(passwd)], "bob"),
    ):
        args = [*args, "--hostname", "mx.test", "--sendmail", CAPTURE]
        shown = {
            (name, mechanism): {salt_shown(args, env, name, mechanism) for _ in range(2)}
            for name in (known, known.upper(), "nobody", "NOBODY")
            for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-1")
        }
        # Each name shows one salt, whichever process answers and whichever hash...
        for name in (known, known.upper(), "nobody", "NOBODY"):
            salts = shown[(name, "SCRAM-SHA-256")] | shown[(name, "SCRAM-SHA-1")]
            assert len(salts) == 1, (name, salts)
        # ...each spelling its own, known or not, and none a prober could compute.
        salts = [next(iter(shown[(n, "SCRAM-SHA-256")])) for n in (known, known.upper())]
        assert salts[0] != salts[1]
        public = hashlib.sha256(f"ofmipd-scram\0{known}".encode()).digest()[:16]
        assert public not in salts


@pytest.mark.slow
def test_cancelled_exchanges_in_one_session_processes_hold_no_login_slot(tmp_path: Path) -> None:
    # Each `ofmipd -1` gives its reservation back before it exits: otherwise five
    # cancelled exchanges would lock the name out ("too many logins in progress") for
    # everyone, the real user included, until the holds expired.
    from tests.ofmipd_server import CAPTURE, server_env

    users = authfile(tmp_path, "alice:s3cret\n")
    args = ["-a", str(users), "--hostname", "mx.test", "--sendmail", CAPTURE]
    env = server_env()
    salts = {salt_shown(args, env, "alice", "SCRAM-SHA-256") for _ in range(8)}
    assert len(salts) == 1
