"""The htpasswd authenticator against files written by Apache's real `htpasswd` tool."""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from auth_backends import BackendSpec
from auth_backends import create as create_backend
from auth_backends.htpasswd import Htpasswd
from auth_backends.htpasswd import create as create_htpasswd
from ofmipd.auth import Chain, Decision, Outcome, Secret, Verdict, can_lookup_plaintext
from ofmipd.errors import ConfigError
from ofmipd.identity import ClientIdentity

SECRETS: list[bytes] = []  # every password and hash a test wrote; none may reach a log record

# htpasswd's flags per scheme (this htpasswd: -2 is SHA-256, -5 SHA-512; -B's cost is 5).
SCHEMES = {
    "bcrypt": ["-B", "-C", "5"],
    "bcrypt-default": ["-B"],
    "apr1": ["-m"],
    "sha1": ["-s"],
    "sha256": ["-2"],
    "sha512": ["-5"],
}


def htpasswd(path: Path, user: str, password: str | bytes, *flags: str) -> None:
    """Add or change a user with the real tool (-c when the file does not exist yet)."""
    raw = password.encode() if isinstance(password, str) else password
    create = [] if path.exists() else ["-c"]
    command: list[str | bytes] = ["htpasswd", *create, "-b", *flags, str(path), user, raw]
    subprocess.run(command, check=True, capture_output=True)
    SECRETS.append(raw)


@pytest.fixture(autouse=True)
def no_secret_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    for record in caplog.records:
        text = record.getMessage()
        for secret in SECRETS:
            if len(secret) >= 6:
                assert secret.decode("utf-8", "replace") not in text, "a secret reached the log"
        assert "$2y$" not in text and "$apr1$" not in text and "{SHA}" not in text


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "htpasswd"


OPEN: list[Htpasswd] = []


def open_file(path: Path, workers: int = 2, timeout: float = 10) -> Htpasswd:
    backend = Htpasswd(str(path), workers=workers, timeout=timeout)
    OPEN.append(backend)
    return backend


@pytest.fixture(autouse=True)
def close_backends() -> Iterator[None]:
    yield
    while OPEN:
        asyncio.run(OPEN.pop().close())


def verify(backend: Htpasswd, user: str, password: str | bytes, client: ClientIdentity) -> Outcome:
    raw = password.encode() if isinstance(password, str) else password

    return asyncio.run(backend.verify(user, Secret(raw), client))


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_each_htpasswd_scheme_accepts_the_password_and_rejects_others(
    path: Path, client, scheme: str
) -> None:
    htpasswd(path, "alice", "correct horse", *SCHEMES[scheme])
    htpasswd(path, "bob", "b\u00f6b's p\u00e4ss", *SCHEMES[scheme])
    backend = create_htpasswd(BackendSpec("htpasswd", arg=str(path)))
    OPEN.append(backend)
    good = verify(backend, "alice", "correct horse", client)
    assert (good.verdict, good.user) == (Verdict.ACCEPT, "alice")
    assert verify(backend, "bob", "b\u00f6b's p\u00e4ss", client).verdict is Verdict.ACCEPT
    for wrong in ("correct horsE", "correct horse ", " correct horse", "correct", "x"):
        outcome = verify(backend, "alice", wrong, client)
        assert outcome.verdict is Verdict.REJECT
        assert outcome.reason == f"password mismatch for alice in {path}"
    assert verify(backend, "bob", "correct horse", client).verdict is Verdict.REJECT


def test_default_bcrypt_cost_is_recognised(path: Path) -> None:
    htpasswd(path, "alice", "pw-default", "-B")
    header = path.read_text().split(":", 1)[1][:7]
    assert header == "$2y$05$"  # what this htpasswd writes; the latency report relies on it


@pytest.mark.parametrize("field", ["!locked", "*", "", "!", "*LK*", "plain-text"])
def test_entries_with_no_recognised_hash_never_match(path: Path, client, field: str) -> None:
    htpasswd(path, "alice", "pw-alice", "-B", "-C", "5")
    with open(path, "a") as handle:
        handle.write(f"locked:{field}\n")
    backend = open_file(path, workers=2, timeout=10)
    for attempt in {field or "x", "!locked", "*", "x", "plain-text"}:
        outcome = verify(backend, "locked", attempt, client)
        assert outcome.verdict is Verdict.REJECT
        assert outcome.reason == f"unusable hash for locked in {path}"


def test_plaintext_des_and_disabled_hashes_from_the_real_tool_never_match(
    path: Path, client
) -> None:
    htpasswd(path, "plain", "plain-pw", "-p")  # -p: stored as is
    htpasswd(path, "des", "des-pw", "-d")  # -d: 8-character DES crypt, refused
    htpasswd(path, "was", "was-pw", "-B", "-C", "5")
    lines = path.read_text().splitlines()
    # A common way to lock an account: prefix its hash with "!".
    path.write_text("\n".join(f"was:!{x[4:]}" if x.startswith("was:") else x for x in lines))
    backend = open_file(path, workers=2, timeout=10)
    for user, password in (("plain", "plain-pw"), ("des", "des-pw"), ("was", "was-pw")):
        outcome = verify(backend, user, password, client)
        assert (outcome.verdict, outcome.reason) == (
            Verdict.REJECT,
            f"unusable hash for {user} in {path}",
        )
    plain_field = path.read_text().splitlines()[0].split(":", 1)[1]
    assert verify(backend, "plain", plain_field, client).verdict is Verdict.REJECT


def test_malformed_bcrypt_hash_is_unusable_not_a_traceback(path: Path, client) -> None:
    path.write_text("short:$2y$05$tooshort\n")
    backend = open_file(path, workers=1, timeout=10)
    outcome = verify(backend, "short", "anything", client)
    assert outcome.verdict is Verdict.REJECT
    assert outcome.reason == f"unusable hash for short in {path}"


def test_password_longer_than_bcrypt_takes_is_rejected(path: Path, client) -> None:
    long_password = "a" * 72 + "Z"  # 73 bytes: htpasswd -B quietly hashes only the first 72
    htpasswd(path, "alice", long_password, "-B", "-C", "5")
    htpasswd(path, "sha", long_password, "-5")
    backend = open_file(path, workers=2, timeout=10)
    outcome = verify(backend, "alice", long_password, client)
    assert outcome.verdict is Verdict.REJECT
    assert "longer than bcrypt's 72 bytes" in outcome.reason
    assert verify(backend, "alice", long_password[:72], client).verdict is Verdict.ACCEPT
    # Only bcrypt has the limit; SHA-512 crypt takes the whole password.
    assert verify(backend, "sha", long_password, client).verdict is Verdict.ACCEPT
    assert verify(backend, "sha", long_password[:72], client).verdict is Verdict.REJECT
    # Longer than libpass accepts at all (4 KiB): still an answer, not an exception.
    for user in ("alice", "sha", "nobody"):
        assert verify(backend, user, "b" * 5000, client).verdict is Verdict.REJECT


@pytest.mark.parametrize("scheme", ["bcrypt", "apr1", "sha1", "sha256", "sha512"])
def test_password_bytes_that_are_not_utf8(path: Path, client, scheme: str) -> None:
    htpasswd(path, "latin", b"caf\xe9-\xff", *SCHEMES[scheme])
    backend = open_file(path, workers=2, timeout=10)
    assert verify(backend, "latin", b"caf\xe9-\xff", client).verdict is Verdict.ACCEPT
    assert verify(backend, "latin", b"caf\xe9-\xfe", client).verdict is Verdict.REJECT
    assert verify(backend, "latin", "caf\u00e9-\u00ff", client).verdict is Verdict.REJECT


def test_user_names_are_case_sensitive_and_first_entry_wins(path: Path, client) -> None:
    htpasswd(path, "alice", "first-pw", "-m")
    with open(path, "a") as handle:
        handle.write("# a comment line\n\n")
    second = subprocess.run(
        ["htpasswd", "-nb", "-m", "alice", "second-pw"], check=True, capture_output=True
    ).stdout
    with open(path, "ab") as handle:
        handle.write(second.strip() + b"\n")
    backend = open_file(path, workers=2, timeout=10)
    assert verify(backend, "alice", "first-pw", client).verdict is Verdict.ACCEPT
    assert verify(backend, "alice", "second-pw", client).verdict is Verdict.REJECT
    unknown = verify(backend, "Alice", "first-pw", client)
    assert (unknown.verdict, unknown.reason) == (Verdict.REJECT, f"no such user in {path}")


def test_edits_with_htpasswd_are_seen_by_the_same_backend(path: Path, client) -> None:
    htpasswd(path, "alice", "alice-1", "-B", "-C", "5")
    backend = open_file(path, workers=2, timeout=10)
    assert verify(backend, "carol", "carol-1", client).verdict is Verdict.REJECT
    htpasswd(path, "carol", "carol-1", "-B", "-C", "5")
    assert verify(backend, "carol", "carol-1", client).verdict is Verdict.ACCEPT
    htpasswd(path, "alice", "alice-2", "-5")
    assert verify(backend, "alice", "alice-2", client).verdict is Verdict.ACCEPT
    assert verify(backend, "alice", "alice-1", client).verdict is Verdict.REJECT
    subprocess.run(["htpasswd", "-D", str(path), "carol"], check=True, capture_output=True)
    assert verify(backend, "carol", "carol-1", client).verdict is Verdict.REJECT


def test_file_removed_after_start_gives_tempfail(path: Path, client) -> None:
    htpasswd(path, "alice", "pw-alice", "-m")
    backend = open_file(path, workers=2, timeout=10)
    content = path.read_bytes()
    path.unlink()
    outcome = verify(backend, "alice", "pw-alice", client)
    assert outcome.verdict is Verdict.TEMPFAIL
    assert outcome.reason == f"htpasswd {path}: No such file or directory"
    path.write_bytes(content)
    assert verify(backend, "alice", "pw-alice", client).verdict is Verdict.ACCEPT


def test_missing_file_and_bad_settings_refuse_to_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"htpasswd .*/absent: No such file or directory"):
        create_htpasswd(BackendSpec("htpasswd", arg=str(tmp_path / "absent")))
    htpasswd(tmp_path / "h", "alice", "pw-alice", "-m")
    spec = {"path": str(tmp_path / "h")}
    for bad, message in (
        ({"workers": 0}, "workers must be"),
        ({"timeout": "1s"}, "timeout must be"),
        ({"colour": "red"}, "unknown setting 'colour'"),
    ):
        with pytest.raises(ConfigError, match=message):
            create_htpasswd(BackendSpec("htpasswd", options={**spec, **bad}))


def test_created_through_the_registry_and_not_a_plaintext_source(path: Path, client) -> None:
    htpasswd(path, "alice", "pw-alice", "-B", "-C", "5")
    for spec in (
        BackendSpec("htpasswd", arg=str(path)),
        BackendSpec("htpasswd", options={"path": str(path), "workers": 1, "timeout": 5}),
    ):
        backend = create_backend(spec)
        assert (backend.name, backend.target) == ("htpasswd", str(path))
        assert not can_lookup_plaintext(backend)
        assert not Chain([backend]).supports_cram_md5
        decision = asyncio.run(Chain([backend]).authenticate(b"alice", b"pw-alice", client))
        assert decision.verdict is Verdict.ACCEPT
        asyncio.run(backend.close())  # type: ignore[attr-defined]


def test_world_readable_file_is_warned_about(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    htpasswd(path, "alice", "pw-alice", "-m")
    path.chmod(0o640)
    open_file(path, workers=1, timeout=5)
    assert not any("world-readable" in r.getMessage() for r in caplog.records)
    path.chmod(0o644)
    open_file(path, workers=1, timeout=5)
    assert any("world-readable (mode 0644)" in r.getMessage() for r in caplog.records)


def test_bcrypt_runs_off_the_event_loop(path: Path, client) -> None:
    htpasswd(path, "alice", "pw-alice", "-B", "-C", "12")  # ~0.3 s or more per verify
    backend = open_file(path, workers=2, timeout=30)

    async def main() -> tuple[Outcome, int, float]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        started = time.perf_counter()
        outcome = await backend.verify("alice", Secret(b"pw-alice"), client)
        took = time.perf_counter() - started
        done.set()
        await task
        await backend.close()
        return outcome, ticks, took

    outcome, ticks, took = asyncio.run(main())
    assert outcome.verdict is Verdict.ACCEPT
    assert took > 0.05
    assert ticks >= 3, "the loop stood still while bcrypt ran"


@pytest.mark.slow
def test_busy_workers_give_tempfail_not_reject(path: Path, client) -> None:
    htpasswd(path, "alice", "pw-alice", "-B", "-C", "13")  # ~0.6 s or more per verify
    backend = open_file(path, workers=1, timeout=0.05)

    async def main() -> list[Decision]:
        # The queue's timeout becomes TEMPFAIL in the chain's containment, for every backend.
        chain = Chain([backend])
        try:
            return list(
                await asyncio.gather(
                    *(chain.authenticate(b"alice", b"pw-alice", client) for _ in range(2))
                )
            )
        finally:
            await backend.close()

    first, second = asyncio.run(main())
    assert first.verdict is Verdict.ACCEPT
    assert second.verdict is Verdict.TEMPFAIL
    assert "workers busy" in second.reason


def median_seconds(
    backend: Htpasswd, attempts: dict[str, tuple[str, bytes]], client: ClientIdentity, rounds: int
) -> dict[str, float]:
    """Median time per kind of attempt, measured round-robin so that load which comes and
    goes on a busy machine falls on every kind alike."""
    times: dict[str, list[float]] = {kind: [] for kind in attempts}

    async def main() -> None:
        for _ in range(rounds):
            for kind, (user, password) in attempts.items():
                started = time.perf_counter()
                outcome = await backend.verify(user, Secret(password), client)
                times[kind].append(time.perf_counter() - started)
                assert outcome.verdict is Verdict.REJECT

    asyncio.run(main())
    return {kind: statistics.median(each) for kind, each in times.items()}


@pytest.mark.slow
def test_unknown_users_take_as_long_as_wrong_passwords(path: Path, client) -> None:
    for name in ("alice", "bob", "carol"):
        htpasswd(path, name, f"pw-{name}", "-B", "-C", "9")  # ~40 ms: well above the noise
    htpasswd(path, "old", "pw-old", "-m")  # a minority scheme does not set the dummy's cost
    with open(path, "a") as handle:
        handle.write("locked:!locked\n")
    backend = open_file(path, workers=2, timeout=30)
    attempts = {
        "wrong password": ("alice", b"wrong"),
        "unknown user": ("nobody", b"wrong"),
        "locked user": ("locked", b"wrong"),
        "too long for bcrypt": ("alice", b"x" * 80),
    }
    median_seconds(backend, attempts, client, rounds=1)  # warm-up: threads started
    medians = median_seconds(backend, attempts, client, rounds=11)
    wrong = medians["wrong password"]
    for kind, seconds in medians.items():
        assert 0.5 < seconds / wrong < 2, medians


@pytest.mark.slow
def test_unknown_names_cost_as_much_as_the_most_expensive_hash(path: Path, client) -> None:
    # Most users have cheap apr1 hashes; one has bcrypt cost 11 (~0.15 s). Every way of
    # not checking a real hash must cost as much as that user, or timing tells them apart.
    for name in ("ann", "ben", "cat", "dan"):
        htpasswd(path, name, f"pw-{name}", "-m")
    htpasswd(path, "boss", "pw-boss", "-B", "-C", "11")
    with open(path, "a") as handle:
        handle.write("locked:!locked\ngarbage:$2y$11$not-a-bcrypt-hash\n")
    backend = open_file(path, workers=2, timeout=60)
    attempts = {
        "bcrypt user": ("boss", b"wrong"),
        "unknown name": ("nobody", b"wrong"),
        "locked entry": ("locked", b"wrong"),
        "garbage hash": ("garbage", b"wrong"),
        "over bcrypt's 72 bytes": ("boss", b"x" * 80),
        "over 4 KiB, apr1 user": ("ann", b"x" * 5000),
        "over 4 KiB, unknown name": ("nobody", b"x" * 5000),
    }
    median_seconds(backend, attempts, client, rounds=1)  # warm-up: threads started
    medians = median_seconds(backend, attempts, client, rounds=5)
    for kind, seconds in medians.items():
        assert seconds >= 0.7 * medians["bcrypt user"], (kind, medians)


def test_dummy_hash_is_the_costliest_scheme_in_the_file(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("a", "b"):
        htpasswd(path, name, f"pw-{name}-x", "-5", "-r", "1000")  # the common, cheap one
    htpasswd(path, "c", "pw-c-x", "-B", "-C", "9")
    table = open_file(path, workers=1, timeout=5).file.get()
    assert table.dummy is not None
    assert table.dummy.hash.startswith(("$2b$09$", "$2y$09$"))
    assert any("mixes hash costs" in r.getMessage() for r in caplog.records)

    other = path.with_name("other")
    for name in ("a", "b"):
        htpasswd(other, name, f"pw-{name}-x", "-B", "-C", "4")
    htpasswd(other, "c", "pw-c-x", "-5", "-r", "50000")
    table = open_file(other, workers=1, timeout=5).file.get()
    assert table.dummy is not None
    assert table.dummy.hash.startswith("$6$rounds=50000$")


def test_many_users_are_parsed_once(path: Path, client) -> None:
    lines = subprocess.run(
        ["htpasswd", "-nb", "-m", "template", "pw-template"], check=True, capture_output=True
    ).stdout.strip()
    hash_field = lines.split(b":", 1)[1]
    path.write_bytes(b"".join(b"user%d:%s\n" % (i, hash_field) for i in range(10_000)))
    past = time.time() - 60
    os.utime(path, (past, past))
    backend = open_file(path, workers=2, timeout=10)

    async def main() -> None:
        for i in (0, 5000, 9999, 0, 9999):
            outcome = await backend.verify(f"user{i}", Secret(b"pw-template"), client)
            assert outcome.verdict is Verdict.ACCEPT
        await backend.close()

    asyncio.run(main())
    assert backend.file.loads == 1
