"""The passwd-file authenticator against hashes written by Dovecot's real `doveadm pw`."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from auth_backends import BackendSpec
from auth_backends import create as create_backend
from auth_backends.passwd_file import PasswdFile
from ofmipd.auth import Chain, Decision, Outcome, ScramKeys, ScramSource, Secret, Verdict
from ofmipd.errors import ConfigError
from ofmipd.identity import ClientIdentity

PASSWORD = "Heron-Walnut-4417-distinct"
SECRETS: list[str] = [PASSWORD]  # none may reach a log record
SCHEMES = [
    "SCRAM-SHA-256",
    "SCRAM-SHA-1",
    "BLF-CRYPT",
    "ARGON2ID",
    "ARGON2I",  # not in the list, but read: Dovecot writes it too
    "SHA512-CRYPT",
    "SHA256-CRYPT",
    "SSHA512",
    "PLAIN",
    "CLEAR",
]
CLIENT = ClientIdentity("192.0.2.7", 40000)
OPEN: list[PasswdFile] = []


def doveadm_pw(scheme: str, password: str = PASSWORD) -> str:
    """`doveadm pw` output, exactly as Dovecot prints it: {SCHEME}hash."""
    result = subprocess.run(
        ["doveadm", "pw", "-s", scheme, "-p", password], capture_output=True, check=True, text=True
    )
    SECRETS.append(password)
    return result.stdout.strip()


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def open_file(path: Path) -> PasswdFile:
    backend = PasswdFile(str(path), workers=2, timeout=10)
    OPEN.append(backend)
    return backend


def verify(
    backend: PasswdFile, user: str, password: str, client: ClientIdentity = CLIENT
) -> Outcome:
    return asyncio.run(backend.verify(user, Secret(password.encode()), client))


@pytest.fixture(autouse=True)
def no_secret_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    while OPEN:
        asyncio.run(OPEN.pop().close())
    for record in caplog.records:
        text = record.getMessage()
        for secret in SECRETS:
            assert secret not in text, "a secret reached the log"
        assert "$2y$" not in text and "$argon2" not in text, "a hash reached the log"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "users"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_doveadm_scheme_is_accepted_unchanged(path: Path, scheme: str) -> None:
    line = f"alice:{doveadm_pw(scheme)}"
    backend = open_file(write(path, f"# made by doveadm pw -s {scheme}\n{line}\n"))
    good = verify(backend, "alice", PASSWORD)
    assert good.verdict is Verdict.ACCEPT, good
    assert good.user == "alice" and good.reason.startswith("password matches")
    bad = verify(backend, "alice", PASSWORD + "x")
    assert bad.verdict is Verdict.REJECT and "mismatch" in bad.reason
    unknown = verify(backend, "mallory", PASSWORD)
    assert unknown.verdict is Verdict.REJECT and "no such user" in unknown.reason


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_doveadm_scheme_serves_scram_when_it_can(path: Path, scheme: str) -> None:
    """{SCRAM-*} lines hand over their keys, {PLAIN}/{CLEAR} derive them, one-way hashes
    cannot: SCRAM then refuses with a reason that says so."""
    backend = open_file(write(path, f"alice:{doveadm_pw(scheme)}\n"))
    mechanism = "SCRAM-SHA-1" if scheme == "SCRAM-SHA-1" else "SCRAM-SHA-256"
    decision = scram(backend, "alice", PASSWORD, mechanism=mechanism)
    if scheme.startswith("SCRAM-") or scheme in ("PLAIN", "CLEAR"):
        assert decision.verdict is Verdict.ACCEPT and decision.user == "alice", decision
        assert scram(backend, "alice", "wrong-pw", mechanism=mechanism).reason.endswith(
            "proof mismatch"
        )
    else:
        assert decision.verdict is Verdict.REJECT
        assert decision.reason == f"no SCRAM-SHA-256 credentials for alice in {path}"


def test_full_dovecot_line_with_userdb_fields_and_unknown_extra_fields(path: Path) -> None:
    hashed = doveadm_pw("SHA512-CRYPT")
    text = f"alice:{hashed}:1000:1000::/home/alice::userdb_mail=maildir:~/Mail quota=1G\n"
    assert verify(open_file(write(path, text)), "alice", PASSWORD).verdict is Verdict.ACCEPT


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("alice", "not user:{SCHEME}hash"),
        ("alice:secret", "no {SCHEME} prefix"),
        ("alice:{MD5-NONSENSE}abc", "unknown scheme"),
        ("alice:{SCRAM-SHA-256}4096,bm90,base64", "not a valid {SCRAM-SHA-256} hash"),
        ("alice:{BLF-CRYPT}$2y$05$short", "not a valid {BLF-CRYPT} hash"),
        ("alice:{PLAIN}x::::::expires=tomorrow", "is not YYYY-MM-DD"),
        ("alice:{PLAIN}x::::::allow_nets=10.0.0.300/8", "allow_nets"),
        ("alice:{PLAIN}x::::::mechanisms=PLAIN,TELEPATHY", "TELEPATHY"),
        ("alice:{PLAIN}x\nalice:{PLAIN}y", "already has a main password"),
        ("alice:{PLAIN}x::::::label=a\nalice:{PLAIN}y::::::label=a", "already has label 'a'"),
    ],
)
def test_malformed_lines_are_refused_with_their_line_number(
    path: Path, line: str, why: str
) -> None:
    write(path, f"# users\nbob:{{PLAIN}}bob-pw\n{line}\n")
    with pytest.raises(ConfigError) as error:
        open_file(path)
    text = str(error.value)
    assert f"line {3 + line.count(chr(10))}:" in text and why in text, text
    assert "\n" not in text


def test_a_broken_edit_gives_tempfail_until_fixed(path: Path) -> None:
    backend = open_file(write(path, "alice:{PLAIN}first-pw\n"))
    write(path, "alice:{PLAIN}first-pw\nbob secret\n")
    outcome = verify(backend, "alice", "first-pw")
    assert outcome.verdict is Verdict.TEMPFAIL and "line 2" in outcome.reason
    write(path, "alice:{PLAIN}first-pw\n")
    assert verify(backend, "alice", "first-pw").verdict is Verdict.ACCEPT


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o660, 0o400])
def test_mode_other_than_0600_or_0640_is_refused(path: Path, mode: int) -> None:
    write(path, "alice:{PLAIN}pw-one\n", mode)
    with pytest.raises(ConfigError, match="must be 0600 or 0640"):
        open_file(path)


def test_mode_0640_is_allowed_and_a_later_chmod_gives_tempfail(path: Path) -> None:
    backend = open_file(write(path, "alice:{PLAIN}pw-one\n", 0o640))
    assert verify(backend, "alice", "pw-one").verdict is Verdict.ACCEPT
    path.chmod(0o644)
    assert verify(backend, "alice", "pw-one").verdict is Verdict.TEMPFAIL


def test_edits_are_seen_without_a_restart(path: Path) -> None:
    backend = open_file(write(path, f"alice:{doveadm_pw('SHA256-CRYPT')}\n"))
    assert verify(backend, "alice", PASSWORD).verdict is Verdict.ACCEPT
    tmp = path.with_suffix(".new")
    write(tmp, f"alice:{doveadm_pw('SHA256-CRYPT', 'changed-pw-9')}\n")
    os.replace(tmp, path)  # as an editor or ofmipd-passwd saves
    assert verify(backend, "alice", PASSWORD).verdict is Verdict.REJECT
    assert verify(backend, "alice", "changed-pw-9").verdict is Verdict.ACCEPT


@pytest.mark.slow
def test_unknown_users_cost_a_check_at_the_costliest_scheme(path: Path) -> None:
    argon = doveadm_pw("ARGON2ID")
    backend = open_file(write(path, f"cheap:{{PLAIN}}plain-pw\nslow:{argon}\n"))
    assert backend.file.get().dummy is not None
    assert backend.file.get().dummy.handler.name == "argon2"  # type: ignore[union-attr]

    def timed(user: str) -> float:
        started = time.perf_counter()
        verify(backend, user, "guess-guess")
        return time.perf_counter() - started

    slow = min(timed("slow") for _ in range(3))
    unknown = min(timed("nobody") for _ in range(3))
    cheap = min(timed("cheap") for _ in range(3))
    assert unknown > slow * 0.5, (unknown, slow)
    assert unknown > cheap * 5, (unknown, cheap)


def test_argon2_runs_off_the_event_loop(path: Path) -> None:
    backend = open_file(write(path, f"alice:{doveadm_pw('ARGON2ID')}\n"))

    async def main() -> tuple[Outcome, int]:
        ticks = 0
        task = asyncio.ensure_future(backend.verify("alice", Secret(PASSWORD.encode()), CLIENT))
        while not task.done():
            await asyncio.sleep(0.005)
            ticks += 1
        return task.result(), ticks

    outcome, ticks = asyncio.run(main())
    assert outcome.verdict is Verdict.ACCEPT
    assert ticks >= 3  # the loop kept turning while argon2 hashed


def test_allow_nets_refuses_other_addresses_and_says_so(path: Path) -> None:
    hashed = doveadm_pw("SHA512-CRYPT")
    backend = open_file(write(path, f"alice:{hashed}::::::allow_nets=10.1.0.0/16,2001:db8::/32\n"))
    outside = verify(backend, "alice", PASSWORD)
    assert outside.verdict is Verdict.REJECT
    assert "not allowed from 192.0.2.7" in outside.reason and "allow_nets=" in outside.reason
    inside = ClientIdentity("10.1.2.3", 4000)
    assert verify(backend, "alice", PASSWORD, inside).verdict is Verdict.ACCEPT
    inside6 = ClientIdentity("2001:db8::5", 4000)
    assert verify(backend, "alice", PASSWORD, inside6).verdict is Verdict.ACCEPT
    # A wrong password from outside is a plain mismatch: the scope is not revealed.
    assert "mismatch" in verify(backend, "alice", "wrong-pw-1").reason


def test_nologin_refuses_a_correct_password_with_its_reason(path: Path) -> None:
    text = f'alice:{doveadm_pw("BLF-CRYPT")}::::::nologin reason="left on 1 May"\n'
    outcome = verify(open_file(write(path, text)), "alice", PASSWORD)
    assert outcome.verdict is Verdict.REJECT
    assert "nologin" in outcome.reason and "left on 1 May" in outcome.reason


# ---- app passwords -------------------------------------------------------------------


def test_any_app_password_in_scope_accepts_and_the_label_is_named(path: Path) -> None:
    main = doveadm_pw("SHA512-CRYPT")
    phone = doveadm_pw("SCRAM-SHA-256", "phone-app-pw-1")
    laptop = doveadm_pw("BLF-CRYPT", "laptop-app-pw-2")
    old = doveadm_pw("SHA256-CRYPT", "old-app-pw-3")
    text = (
        f"alice:{main}\n"
        f"alice:{phone}::::::label=phone\n"
        f"alice:{laptop}::::::label=laptop allow_nets=192.0.2.0/24\n"
        f"alice:{old}::::::label=old expires=2020-01-31\n"
    )
    backend = open_file(write(path, text))
    assert verify(backend, "alice", PASSWORD).reason.startswith("password matches")
    phone_outcome = verify(backend, "alice", "phone-app-pw-1")
    assert phone_outcome.verdict is Verdict.ACCEPT and "'phone'" in phone_outcome.reason
    assert "laptop" in verify(backend, "alice", "laptop-app-pw-2").reason
    elsewhere = verify(backend, "alice", "laptop-app-pw-2", ClientIdentity("203.0.113.1"))
    assert elsewhere.verdict is Verdict.REJECT and "'laptop'" in elsewhere.reason
    expired = verify(backend, "alice", "old-app-pw-3")
    assert expired.verdict is Verdict.REJECT and "expired on 2020-01-31" in expired.reason
    for outcome in (phone_outcome, elsewhere, expired):
        assert "app-pw" not in outcome.reason


def test_mechanisms_scope_keeps_a_scram_only_password_from_plain(path: Path) -> None:
    text = f"alice:{doveadm_pw('SCRAM-SHA-256')}::::::label=mutt mechanisms=SCRAM-SHA-256\n"
    backend = open_file(write(path, text))
    outcome = verify(backend, "alice", PASSWORD)
    assert outcome.verdict is Verdict.REJECT
    assert "limited to mechanisms=SCRAM-SHA-256" in outcome.reason
    keys = asyncio.run(backend.scram_keys("alice", "SCRAM-SHA-256", CLIENT))
    assert isinstance(keys, list) and [k.label for k in keys] == ["mutt"]
    assert keys[0].refusal is None


def client_proof_matches(keys: ScramKeys, password: str, digest: str) -> bool:
    """What a SCRAM client computes from the password, checked against the stored keys."""
    salted = hashlib.pbkdf2_hmac(digest, password.encode(), keys.salt, keys.iterations)
    client_key = hmac.new(salted, b"Client Key", digest).digest()
    server_key = hmac.new(salted, b"Server Key", digest).digest()
    stored = hashlib.new(digest, client_key).digest()
    return stored == keys.stored_key and server_key == keys.server_key


def test_scram_keys_come_from_doveadm_entries_and_plaintext(path: Path) -> None:
    text = (
        f"alice:{doveadm_pw('SCRAM-SHA-256')}\n"
        f"alice:{doveadm_pw('SCRAM-SHA-1', 'sha1-app-pw-4')}::::::label=old-client\n"
        "alice:{PLAIN}plain-app-pw-5::::::label=plain\n"
        f"alice:{doveadm_pw('BLF-CRYPT', 'bcrypt-app-pw')}::::::label=bcrypt\n"
        "alice:{PLAIN}netted-app-pw::::::label=netted allow_nets=10.0.0.0/8\n"
        "bob:{PLAIN}bob-pw::::::nologin\n"
    )
    backend = open_file(write(path, text))
    assert isinstance(backend, ScramSource)
    sha256 = asyncio.run(backend.scram_keys("alice", "SCRAM-SHA-256", CLIENT))
    assert isinstance(sha256, list)
    assert [k.label for k in sha256] == [None, "plain", "netted"]  # bcrypt cannot
    assert {k.user for k in sha256} == {"alice"}
    assert [k.refusal is None for k in sha256] == [True, True, False]
    assert "not allowed from 192.0.2.7: allow_nets=10.0.0.0/8" in (sha256[2].refusal or "")
    assert client_proof_matches(sha256[0], PASSWORD, "sha256")
    assert client_proof_matches(sha256[1], "plain-app-pw-5", "sha256")
    assert sha256[1].salt == sha256[2].salt  # a user's {PLAIN} lines share one salt
    inside = asyncio.run(backend.scram_keys("alice", "SCRAM-SHA-256", ClientIdentity("10.0.0.1")))
    assert isinstance(inside, list) and inside[2].refusal is None
    sha1 = asyncio.run(backend.scram_keys("alice", "SCRAM-SHA-1-PLUS", CLIENT))
    assert isinstance(sha1, list) and [k.label for k in sha1] == ["old-client", "plain", "netted"]
    assert client_proof_matches(sha1[0], "sha1-app-pw-4", "sha1")
    unknown = asyncio.run(backend.scram_keys("mallory", "SCRAM-SHA-256", CLIENT))
    assert isinstance(unknown, Outcome) and unknown.verdict is Verdict.REJECT
    nologin = asyncio.run(backend.scram_keys("bob", "SCRAM-SHA-256", CLIENT))
    assert isinstance(nologin, list) and "nologin for bob" in (nologin[0].refusal or "")


# ---- SCRAM decisions: the chain, ofmipd's exchange and scramp's client, in-process ------


def scram(
    backend: PasswdFile,
    user: str,
    password: str,
    client: ClientIdentity = CLIENT,
    mechanism: str = "SCRAM-SHA-256",
) -> Decision:
    """The decision on one SCRAM login, as the server makes it (ofmipd-authtest's way)."""
    from ofmipd.authtest import scram_exchange

    chain = Chain([backend])
    return asyncio.run(scram_exchange(chain, mechanism, user.encode(), password.encode(), client))


def test_scram_honours_allow_nets_expiry_mechanisms_and_nologin(path: Path) -> None:
    text = (
        f"alice:{doveadm_pw('SCRAM-SHA-256')}::::::allow_nets=10.0.0.0/8\n"
        f"bob:{doveadm_pw('SCRAM-SHA-256', 'bob-old-pw')}::::::label=old expires=2020-01-31\n"
        f"carol:{doveadm_pw('SCRAM-SHA-256', 'carol-pw-1')}::::::mechanisms=SCRAM-SHA-256-PLUS\n"
        f'dave:{doveadm_pw("SCRAM-SHA-256", "dave-pw-2")}::::::nologin reason="left in May"\n'
        f"erin:{doveadm_pw('SCRAM-SHA-1', 'erin-pw-3')}::::::mechanisms=PLAIN\n"
    )
    backend = open_file(write(path, text))
    inside = scram(backend, "alice", PASSWORD, ClientIdentity("10.1.2.3"))
    assert inside.verdict is Verdict.ACCEPT and inside.user == "alice", inside
    outside = scram(backend, "alice", PASSWORD)
    assert outside.verdict is Verdict.REJECT
    assert outside.reason == (
        "SCRAM-SHA-256: password of alice is not allowed from 192.0.2.7: allow_nets=10.0.0.0/8"
    )
    # A wrong password from outside is a plain mismatch: the scope is not revealed.
    assert scram(backend, "alice", "wrong-pw-1").reason == "SCRAM-SHA-256: proof mismatch"
    expired = scram(backend, "bob", "bob-old-pw")
    assert expired.verdict is Verdict.REJECT and "'old' of bob expired on 2020-01-31" in (
        expired.reason
    )
    unbound = scram(backend, "carol", "carol-pw-1")
    assert unbound.verdict is Verdict.REJECT
    assert "limited to mechanisms=SCRAM-SHA-256-PLUS" in unbound.reason
    nologin = scram(backend, "dave", "dave-pw-2")
    assert nologin.verdict is Verdict.REJECT and "nologin for dave" in nologin.reason
    assert "left in May" in nologin.reason
    plain_only = scram(backend, "erin", "erin-pw-3", mechanism="SCRAM-SHA-1")
    assert plain_only.verdict is Verdict.REJECT and "limited to mechanisms=PLAIN" in (
        plain_only.reason
    )
    assert verify(backend, "erin", "erin-pw-3").verdict is Verdict.ACCEPT  # its own mechanism


def test_scram_checks_every_in_scope_line_with_the_offered_salt(path: Path) -> None:
    """One salt goes out, so lines sharing it (as ofmipd-passwd writes them) all work; a
    doveadm line with a salt of its own works only when it is the one offered."""
    from ofmipd.passwd import hash_password

    salt = os.urandom(16)
    main = hash_password(PASSWORD.encode(), "SCRAM-SHA-256", salt)
    phone = hash_password(b"phone-app-pw-1", "SCRAM-SHA-256", salt)
    office = hash_password(b"office-app-pw-2", "SCRAM-SHA-256", salt)
    own = doveadm_pw("SCRAM-SHA-256", "own-salt-pw-3")
    text = (
        f"alice:{main}\n"
        f"alice:{phone}::::::label=phone\n"
        f"alice:{office}::::::label=office allow_nets=10.0.0.0/8\n"
        f"alice:{own}::::::label=own\n"
        f"bob:{own}::::::label=solo allow_nets=10.0.0.0/8\n"
        f"bob:{phone}::::::label=phone\n"
    )
    backend = open_file(write(path, text))
    assert scram(backend, "alice", PASSWORD).reason == "SCRAM-SHA-256 proof matches"
    phone_login = scram(backend, "alice", "phone-app-pw-1")
    assert phone_login.verdict is Verdict.ACCEPT, phone_login
    assert phone_login.reason == "SCRAM-SHA-256 proof matches (app password 'phone')"
    office_there = scram(backend, "alice", "office-app-pw-2", ClientIdentity("10.9.9.9"))
    assert office_there.verdict is Verdict.ACCEPT and "'office'" in office_there.reason
    office_here = scram(backend, "alice", "office-app-pw-2")
    assert office_here.verdict is Verdict.REJECT
    assert "app password 'office' of alice is not allowed from 192.0.2.7" in office_here.reason
    # Its own salt is never offered to alice (her main password's is): a mismatch.
    assert scram(backend, "alice", "own-salt-pw-3").reason == "SCRAM-SHA-256: proof mismatch"
    # bob's first line is out of scope here, so the salt offered is that of his second.
    assert scram(backend, "bob", "phone-app-pw-1").verdict is Verdict.ACCEPT
    assert scram(backend, "bob", "own-salt-pw-3", ClientIdentity("10.0.0.1")).verdict is (
        Verdict.ACCEPT
    )
    # Salts never mix: bob's own-salt line is not checked while his phone's salt is out.
    assert scram(backend, "bob", "own-salt-pw-3").reason == "SCRAM-SHA-256: proof mismatch"


def test_scram_reports_the_name_as_the_file_spells_it(path: Path) -> None:
    """passwd-file names match exactly, for PLAIN and SCRAM alike: no case folding and no
    Unicode normalisation (Dovecot's passwd-file without auth_username_format)."""
    import unicodedata

    nfc = unicodedata.normalize("NFC", "zoë")
    text = f"alice:{doveadm_pw('SCRAM-SHA-256')}\n{nfc}:{doveadm_pw('SCRAM-SHA-256')}\n"
    backend = open_file(write(path, text))
    decision = scram(backend, "alice", PASSWORD)
    assert decision.verdict is Verdict.ACCEPT and decision.user == "alice"
    for name in ("ALICE", unicodedata.normalize("NFD", "zoë")):
        assert verify(backend, name, PASSWORD).reason.startswith("no such user")
        refused = scram(backend, name, PASSWORD)
        assert refused.verdict is Verdict.REJECT and refused.reason.startswith("no such user")
    assert scram(backend, nfc, PASSWORD).user == nfc


def test_created_from_the_flag_and_from_toml(path: Path, tmp_path: Path) -> None:
    write(path, "alice:{PLAIN}pw-one\n")
    from_flag = create_backend(BackendSpec(kind="passwd-file", arg=str(path)))
    from_toml = create_backend(BackendSpec(kind="passwd-file", options={"path": str(path)}))
    for backend in (from_flag, from_toml):
        assert isinstance(backend, PasswdFile)
        OPEN.append(backend)
        assert backend.name == "passwd-file" and backend.target == str(path)
    with pytest.raises(ConfigError, match="unknown setting"):
        create_backend(BackendSpec(kind="passwd-file", options={"path": str(path), "x": 1}))
    with pytest.raises(ConfigError, match="No such file"):
        create_backend(BackendSpec(kind="passwd-file", arg=str(tmp_path / "missing")))


def authtest(
    path: Path, user: str, password: str, ip: str, mechanism: str = "PLAIN"
) -> tuple[int, str]:
    authtest_script = str(Path(sys.executable).parent / "ofmipd-authtest")
    result = subprocess.run(
        [
            authtest_script,
            "--passwd-file",
            str(path),
            "--remote-ip",
            ip,
            "--mechanism",
            mechanism,
            user,
        ],  # fmt: skip
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert password not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result.returncode, result.stdout


@pytest.mark.slow
def test_authtest_explains_label_scope_nologin_and_expiry(path: Path) -> None:
    text = (
        f"alice:{doveadm_pw('SHA512-CRYPT')}::::::allow_nets=10.0.0.0/8\n"
        f"alice:{doveadm_pw('SCRAM-SHA-256', 'tablet-app-pw-6')}::::::label=tablet\n"
        f"alice:{doveadm_pw('SCRAM-SHA-1', 'stale-app-pw-7')}::::::label=stale expires=2021-03-01\n"
        f'bob:{doveadm_pw("BLF-CRYPT", "bob-pw-8")}::::::nologin reason="account moved to mx2"\n'
    )
    write(path, text)
    code, out = authtest(path, "alice", "tablet-app-pw-6", "192.0.2.1")
    assert code == 0 and "app password 'tablet' matches" in out, out
    code, out = authtest(path, "alice", PASSWORD, "192.0.2.1")
    assert code == 1 and "not allowed from 192.0.2.1: allow_nets=10.0.0.0/8" in out, out
    code, out = authtest(path, "alice", PASSWORD, "10.9.8.7")
    assert code == 0 and "password matches" in out, out
    code, out = authtest(path, "alice", "stale-app-pw-7", "10.9.8.7")
    assert code == 1 and "app password 'stale' of alice expired on 2021-03-01" in out, out
    code, out = authtest(path, "bob", "bob-pw-8", "10.9.8.7")
    assert code == 1 and "nologin for bob" in out and "account moved to mx2" in out, out


@pytest.mark.slow
def test_authtest_explains_scram_decisions_label_scope_nologin_and_expiry(path: Path) -> None:
    text = (
        f"alice:{doveadm_pw('SCRAM-SHA-256')}::::::allow_nets=10.0.0.0/8\n"
        f"bob:{doveadm_pw('SCRAM-SHA-256', 'tablet-app-pw-6')}::::::label=tablet\n"
        f"carol:{doveadm_pw('SCRAM-SHA-1', 'stale-app-pw-7')}::::::label=stale expires=2021-03-01\n"
        f'dave:{doveadm_pw("SCRAM-SHA-256", "dave-pw-8")}::::::nologin reason="moved to mx2"\n'
    )
    write(path, text)
    code, out = authtest(path, "bob", "tablet-app-pw-6", "192.0.2.1", "SCRAM-SHA-256")
    assert code == 0, out
    assert "accept (SCRAM-SHA-256 proof matches (app password 'tablet'))" in out, out
    assert "result: accept for user bob" in out
    code, out = authtest(path, "alice", PASSWORD, "192.0.2.1", "SCRAM-SHA-256")
    assert code == 1 and "client hears: 535" in out, out
    assert "password of alice is not allowed from 192.0.2.1: allow_nets=10.0.0.0/8" in out, out
    code, out = authtest(path, "alice", PASSWORD, "10.9.8.7", "SCRAM-SHA-256")
    assert code == 0 and "SCRAM-SHA-256 proof matches" in out, out
    code, out = authtest(path, "carol", "stale-app-pw-7", "10.9.8.7", "SCRAM-SHA-1")
    assert code == 1 and "SCRAM-SHA-1: app password 'stale' of carol expired on 2021-03-01" in out
    code, out = authtest(path, "dave", "dave-pw-8", "10.9.8.7", "SCRAM-SHA-256")
    assert code == 1 and "nologin for dave" in out and "moved to mx2" in out, out
    # A wrong password is a mismatch, whatever the scope: authtest reveals no more.
    code, out = authtest(path, "dave", "wrong-pw-9", "10.9.8.7", "SCRAM-SHA-256")
    assert code == 1 and "proof mismatch" in out and "mx2" not in out, out


def test_mixed_costs_are_warned_about_as_a_passwd_file(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    open_file(write(path, f"cheap:{{PLAIN}}plain-pw\nslow:{doveadm_pw('BLF-CRYPT')}\n"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith(f"passwd-file {path} mixes hash costs") for w in warnings), warnings
