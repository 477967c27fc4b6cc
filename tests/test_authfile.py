"""The authfile authenticator: tmda-ofmipd's user:password file, its mode rule and live edits."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from auth_backends import BackendSpec
from auth_backends import create as create_backend
from auth_backends.authfile import AuthFile
from auth_backends.authfile import create as create_authfile
from ofmipd.auth import (
    Chain,
    Found,
    Outcome,
    Secret,
    Verdict,
    can_lookup_plaintext,
    cram_md5_digest,
)
from ofmipd.errors import ConfigError
from ofmipd.identity import ClientIdentity

PASSWORDS = ["s3cret", "pa:ss:word", "Straße 42", "tab\there"]

USERS = """\
# ofmipd users
Alice:s3cret

  bob : pa:ss:word  \r
carol:Straße 42
dave:tab\there
erin:
"""


@pytest.fixture(autouse=True)
def no_password_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    for record in caplog.records:
        text = record.getMessage()
        for password in PASSWORDS:
            assert password not in text, "a password reached the log"


@pytest.fixture
def make_file(tmp_path: Path) -> Callable[..., Path]:
    def make(text: str | bytes = USERS, mode: int = 0o600, name: str = "users") -> Path:
        path = tmp_path / name
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        path.chmod(mode)
        return path

    return make


def verify(backend: AuthFile, user: str, password: str | bytes, client: ClientIdentity):  # type: ignore[no-untyped-def]
    raw = password.encode() if isinstance(password, str) else password
    return asyncio.run(backend.verify(user, Secret(raw), client))


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o700, 0o660, 0o444])
def test_wrong_mode_refuses_to_start_naming_file_and_mode(make_file, mode: int) -> None:
    path = make_file(mode=mode)
    with pytest.raises(ConfigError) as raised:
        create_authfile(BackendSpec("authfile", arg=str(path)))
    assert str(raised.value) == (f"authfile {path} has mode {mode:04o}; it must be 0400 or 0600")


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_owner_only_modes_are_accepted(make_file, client, mode: int) -> None:
    backend = create_authfile(BackendSpec("authfile", arg=str(make_file(mode=mode))))
    assert verify(backend, "Alice", "s3cret", client).verdict is Verdict.ACCEPT


def test_missing_or_unreadable_file_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"authfile .*/absent: No such file or directory"):
        create_authfile(BackendSpec("authfile", arg=str(tmp_path / "absent")))
    folder = tmp_path / "folder"
    folder.mkdir(mode=0o700)
    folder.chmod(0o600)
    with pytest.raises(ConfigError, match="Is a directory"):
        create_authfile(BackendSpec("authfile", arg=str(folder)))


def test_created_through_the_registry_from_flag_and_toml(make_file, client) -> None:
    path = make_file()
    from_flag = create_backend(BackendSpec("authfile", arg=str(path)))
    from_toml = create_backend(BackendSpec("authfile", options={"path": str(path)}))
    for backend in (from_flag, from_toml):
        assert backend.name == "authfile"
        assert backend.target == str(path)
        assert asyncio.run(backend.verify("alice", Secret(b"s3cret"), client)).verdict is (
            Verdict.ACCEPT
        )
    with pytest.raises(ConfigError, match="unknown setting 'paht'"):
        create_authfile(BackendSpec("authfile", options={"paht": str(path)}))
    with pytest.raises(ConfigError, match="path must name"):
        create_authfile(BackendSpec("authfile", options={}))


def test_relative_path_is_made_absolute(make_file, monkeypatch, client) -> None:
    path = make_file()
    monkeypatch.chdir(path.parent)
    backend = create_authfile(BackendSpec("authfile", arg="users"))
    monkeypatch.chdir("/")
    assert backend.target == str(path)
    assert verify(backend, "alice", "s3cret", client).verdict is Verdict.ACCEPT


def test_comments_blank_lines_whitespace_and_colons(make_file, client) -> None:
    backend = AuthFile(str(make_file()))
    assert verify(backend, "Alice", "s3cret", client).verdict is Verdict.ACCEPT
    # Everything after the first colon is the password; the line's whitespace is not.
    assert verify(backend, "bob", "pa:ss:word", client).verdict is Verdict.ACCEPT
    assert verify(backend, "carol", "Straße 42", client).verdict is Verdict.ACCEPT
    assert verify(backend, "dave", "tab\there", client).verdict is Verdict.ACCEPT
    comment = verify(backend, "# ofmipd users", "x", client)
    assert comment.verdict is Verdict.REJECT
    assert comment.reason == f"no such user in {backend.path}"


def test_user_names_match_case_insensitively_and_come_back_as_written(make_file, client) -> None:
    backend = AuthFile(str(make_file()))
    for typed in ("alice", "ALICE", "aLiCe"):
        outcome = verify(backend, typed, "s3cret", client)
        assert outcome.verdict is Verdict.ACCEPT
        assert outcome.user == "Alice"


@pytest.mark.parametrize(
    "attempt",
    ["s3cre", "s3cret!", "S3cret", "s3cRet", "s4cret", " s3cret", "s3cret ", "s3cret\t", ""],
)
def test_near_misses_are_rejected_without_the_password_in_the_reason(
    make_file, client, attempt: str
) -> None:
    backend = AuthFile(str(make_file()))
    outcome = verify(backend, "alice", attempt, client)
    assert outcome.verdict is Verdict.REJECT
    assert outcome.reason == f"password mismatch for Alice in {backend.path}"


def test_unknown_user_and_empty_password_entry_are_rejected(make_file, client) -> None:
    backend = AuthFile(str(make_file()))
    unknown = verify(backend, "mallory", "s3cret", client)
    assert (unknown.verdict, unknown.reason) == (
        Verdict.REJECT,
        f"no such user in {backend.path}",
    )
    # erin has an empty password: tmda-ofmipd denied such logins; so do we, by any route.
    disabled = verify(backend, "erin", "", client)
    assert disabled.verdict is Verdict.REJECT
    assert "login disabled" in disabled.reason
    found = asyncio.run(backend.lookup_plaintext("erin", client))
    assert isinstance(found, Outcome) and found.verdict is Verdict.REJECT


def test_password_bytes_are_compared_as_bytes(make_file, client) -> None:
    latin1 = "zoe:caf\u00e9\n".encode("latin-1")
    backend = AuthFile(str(make_file(latin1)))
    assert verify(backend, "zoe", b"caf\xe9", client).verdict is Verdict.ACCEPT
    assert verify(backend, "zoe", "caf\u00e9".encode(), client).verdict is Verdict.REJECT
    assert verify(backend, "zoe", b"\xff\xfe", client).verdict is Verdict.REJECT


def test_malformed_lines_are_skipped_with_line_numbers_only(
    make_file, client, caplog: pytest.LogCaptureFixture
) -> None:
    text = b"nocolonhere-s3cret\n:s3cret\n\xff\xfe:pw\nAlice:s3cret\nalice:pa:ss:word\n"
    backend = AuthFile(str(make_file(text)))
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("line 1: not user:password" in m for m in messages)
    assert any("line 2: not user:password" in m for m in messages)
    assert any("line 3: user name is not UTF-8" in m for m in messages)
    assert any("line 5: alice appears again; this line wins" in m for m in messages)
    assert not any("nocolonhere" in m for m in messages)
    # The later line wins, as in tmda-ofmipd, and its spelling is the one reported.
    outcome = verify(backend, "ALICE", "pa:ss:word", client)
    assert (outcome.verdict, outcome.user) == (Verdict.ACCEPT, "alice")
    assert verify(backend, "alice", "s3cret", client).verdict is Verdict.REJECT


def test_lookup_plaintext_gives_the_stored_password(make_file, client) -> None:
    backend = AuthFile(str(make_file()))
    assert can_lookup_plaintext(backend)
    found = asyncio.run(backend.lookup_plaintext("BOB", client))
    assert isinstance(found, Found)
    assert found.user == "bob"
    assert found.secret.reveal() == b"pa:ss:word"
    missing = asyncio.run(backend.lookup_plaintext("mallory", client))
    assert isinstance(missing, Outcome) and missing.verdict is Verdict.REJECT


def test_cram_md5_through_the_chain(make_file, client) -> None:
    chain = Chain([AuthFile(str(make_file()))])
    assert chain.supports_cram_md5
    challenge = b"<1896.697170952@ofmipd.test>"
    good = cram_md5_digest(Secret(b"pa:ss:word"), challenge)
    bad = cram_md5_digest(Secret(b"pa:ss:wordx"), challenge)
    decision = asyncio.run(chain.authenticate_cram_md5(b"Bob", challenge, good, client))
    assert (decision.verdict, decision.user) == (Verdict.ACCEPT, "bob")
    decision = asyncio.run(chain.authenticate_cram_md5(b"bob", challenge, bad, client))
    assert decision.verdict is Verdict.REJECT


def test_edit_in_place_within_one_timestamp_tick_is_seen(make_file, client) -> None:
    path = make_file("alice:secret1\n")
    backend = AuthFile(str(path))
    assert verify(backend, "alice", "secret1", client).verdict is Verdict.ACCEPT
    before = path.stat()
    with open(path, "r+b") as handle:
        handle.write(b"alice:secret2\n")
    # A file system with coarse timestamps leaves mtime, size and inode all as they were;
    # only the rule "a file read soon after its mtime is read again" sees this edit.
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert verify(backend, "alice", "secret2", client).verdict is Verdict.ACCEPT
    assert verify(backend, "alice", "secret1", client).verdict is Verdict.REJECT


def test_replace_by_rename_is_seen_by_its_inode(make_file, client) -> None:
    path = make_file("alice:old\n")
    past = time.time_ns() - 3600 * 10**9  # settled: not re-read for being recent
    os.utime(path, ns=(past, past))
    backend = AuthFile(str(path))
    assert verify(backend, "alice", "old", client).verdict is Verdict.ACCEPT
    assert verify(backend, "alice", "old", client).verdict is Verdict.ACCEPT
    assert backend.file.loads == 1
    new = make_file("alice:new\n", name="users.new")  # same size, same mtime: a new inode
    os.utime(new, ns=(past, past))
    new.rename(path)
    assert verify(backend, "alice", "new", client).verdict is Verdict.ACCEPT
    assert verify(backend, "alice", "old", client).verdict is Verdict.REJECT
    assert backend.file.loads == 2


def test_file_removed_or_mode_broken_after_start_gives_tempfail(
    make_file, client, caplog: pytest.LogCaptureFixture
) -> None:
    path = make_file()
    backend = AuthFile(str(path))
    assert verify(backend, "alice", "s3cret", client).verdict is Verdict.ACCEPT

    path.chmod(0o644)
    for _ in range(3):
        outcome = verify(backend, "alice", "s3cret", client)
        assert outcome.verdict is Verdict.TEMPFAIL
        assert outcome.reason == f"authfile {path} has mode 0644; it must be 0400 or 0600"
    warnings = [r.getMessage() for r in caplog.records if "has mode 0644" in r.getMessage()]
    assert len(warnings) == 1, "an outage is logged once, not once per login"
    outage = asyncio.run(backend.lookup_plaintext("alice", client))
    assert isinstance(outage, Outcome) and outage.verdict is Verdict.TEMPFAIL

    path.chmod(0o600)
    assert verify(backend, "alice", "s3cret", client).verdict is Verdict.ACCEPT

    path.unlink()
    gone = verify(backend, "alice", "s3cret", client)
    assert gone.verdict is Verdict.TEMPFAIL
    assert gone.reason == f"authfile {path}: No such file or directory"
    decision = asyncio.run(Chain([backend]).authenticate(b"alice", b"s3cret", client))
    assert decision.verdict is Verdict.TEMPFAIL

    make_file()
    assert verify(backend, "alice", "s3cret", client).verdict is Verdict.ACCEPT
    assert any("usable again" in r.getMessage() for r in caplog.records)


def test_mode_is_checked_on_the_descriptor_read_not_on_the_path(make_file, client) -> None:
    """A world-readable file swapped in while the 0600 one is being checked must never
    supply the passwords: the check and the read are one descriptor."""
    path = make_file("Alice:s3cret\n")
    intruder = make_file("Alice:stolen\n", mode=0o644, name="intruder")

    class SwapDuringCheck(AuthFile):
        armed = False

        def _check_mode(self, st: os.stat_result) -> None:
            super()._check_mode(st)
            if self.armed:  # the race, made deterministic: the swap lands inside the check
                self.armed = False
                os.replace(intruder, path)

    backend = SwapDuringCheck(str(path))
    path.write_text("Alice:s3cret\n# edited\n")  # an edit, so the next login reads it again
    backend.armed = True
    first = verify(backend, "Alice", "stolen", client)
    second = verify(backend, "Alice", "stolen", client)
    assert first.verdict is Verdict.REJECT  # read from the 0600 file that was checked
    assert second.verdict is Verdict.TEMPFAIL
    assert second.reason == f"authfile {path} has mode 0644; it must be 0400 or 0600"


def test_fifo_in_place_of_the_file_is_refused_without_waiting(tmp_path: Path, client) -> None:
    fifo = tmp_path / "users"
    os.mkfifo(fifo, 0o600)
    outcome: list[BaseException] = []

    def start() -> None:
        try:
            AuthFile(str(fifo))
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            outcome.append(error)

    starter = threading.Thread(target=start, daemon=True)
    starter.start()
    starter.join(10)
    assert not starter.is_alive(), "opening a FIFO waited for a writer"
    assert isinstance(outcome[0], ConfigError)
    assert str(outcome[0]) == f"authfile {fifo}: not a regular file"


def test_ten_thousand_users_parsed_once_and_looked_up_in_constant_time(make_file, client) -> None:
    lines = "".join(f"user{i}:password-{i}\n" for i in range(10_000))
    path = make_file(lines)
    past = time.time() - 60  # settled file: no racy re-reads
    os.utime(path, (past, past))
    backend = AuthFile(str(path))

    async def many(user: str, password: bytes, times: int) -> float:
        started = time.perf_counter()
        for _ in range(times):
            outcome = await backend.verify(user, Secret(password), client)
            assert outcome.verdict is Verdict.ACCEPT
        return time.perf_counter() - started

    first = asyncio.run(many("user0", b"password-0", 2000))
    last = asyncio.run(many("USER9999", b"password-9999", 2000))
    assert backend.file.loads == 1
    # Generous bounds for a loaded machine; a per-call parse of 10k lines would be ~100x slower.
    assert last / 2000 < 0.001
    assert last < first * 5 + 0.05
