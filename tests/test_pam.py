"""The PAM authenticator against real Linux-PAM: real users, real /etc/pam.d services."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from ctypes import POINTER, addressof, byref, c_char_p, c_void_p, cast, pointer
from pathlib import Path

import pytest
from pam.__internals import (
    PAM_ERROR_MSG,
    PAM_PROMPT_ECHO_OFF,
    PAM_PROMPT_ECHO_ON,
    PAM_TEXT_INFO,
    PamMessage,
    PamResponse,
)

from auth_backends import BackendSpec
from auth_backends import create as create_backend
from auth_backends import pam as pam_backend
from ofmipd.auth import Chain, Decision, Outcome, Secret, Verdict
from ofmipd.errors import ConfigError
from ofmipd.identity import ClientIdentity
from tests.loop_ticker import with_ticker

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "conf" / "pam.d" / "ofmipd"
PLAIN_UNIX = "auth required pam_unix.so nodelay\naccount required pam_unix.so\n"
PASSWORDS: list[str] = []  # every password a test created; none may reach a log record


def run(*command: str, stdin: str | None = None) -> None:
    subprocess.run(command, input=stdin, text=True, check=True, capture_output=True)


@contextlib.contextmanager
def system_users() -> Iterator[Callable[[], tuple[str, str]]]:
    """Real system users with random names and passwords, deleted afterwards."""
    created: list[str] = []

    def make() -> tuple[str, str]:
        name = f"ofmtest_{secrets.token_hex(4)}"
        password = f"pw {secrets.token_urlsafe(12)} \u00e9"  # a space and UTF-8 too
        run("useradd", "-M", "-s", "/usr/sbin/nologin", name)
        created.append(name)
        run("chpasswd", stdin=f"{name}:{password}\n")
        PASSWORDS.append(password)
        return name, password

    try:
        yield make
    finally:
        for name in created:
            subprocess.run(["userdel", "-f", name], capture_output=True)


@contextlib.contextmanager
def pam_services() -> Iterator[Callable[[str], str]]:
    """Real /etc/pam.d/ofmipd-test-<random> services, removed afterwards."""
    created: list[Path] = []

    def make(text: str) -> str:
        name = f"ofmipd-test-{secrets.token_hex(4)}"
        path = Path("/etc/pam.d") / name
        path.write_text(text)
        created.append(path)
        return name

    try:
        yield make
    finally:
        for path in created:
            path.unlink(missing_ok=True)


@pytest.fixture
def make_user() -> Iterator[Callable[[], tuple[str, str]]]:
    with system_users() as make:
        yield make


@pytest.fixture
def make_service() -> Iterator[Callable[[str], str]]:
    with pam_services() as make:
        yield make


@pytest.fixture(autouse=True)
def no_password_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        for password in PASSWORDS:
            assert password not in text, f"password in log record {record.name}"


def backend(service: str, **options: object) -> pam_backend.PamAuth:
    if options:
        return pam_backend.create(BackendSpec("pam", options={"service": service, **options}))
    return pam_backend.create(BackendSpec("pam", service))


async def verify(
    auth: pam_backend.PamAuth, user: str, password: str, client: ClientIdentity
) -> Outcome:
    outcome = await auth.verify(user, Secret(password.encode()), client)
    assert password not in outcome.reason
    return outcome


def test_good_password_accepts(make_user, make_service, client) -> None:
    user, password = make_user()
    auth = backend(make_service(PLAIN_UNIX))
    outcome = asyncio.run(verify(auth, user, password, client))
    assert outcome.verdict is Verdict.ACCEPT, outcome


def test_wrong_password_rejects_with_pam_auth_err(make_user, make_service, client) -> None:
    user, password = make_user()
    auth = backend(make_service(PLAIN_UNIX))
    outcome = asyncio.run(verify(auth, user, password + "x", client))
    assert outcome.verdict is Verdict.REJECT
    assert outcome.reason == "pam_authenticate PAM_AUTH_ERR: Authentication failure"


def test_unknown_user_rejects(make_service, client) -> None:
    auth = backend(make_service(PLAIN_UNIX))
    outcome = asyncio.run(verify(auth, f"ofmnobody_{secrets.token_hex(4)}", "whatever", client))
    assert outcome.verdict is Verdict.REJECT
    assert "PAM_USER_UNKNOWN" in outcome.reason


def test_locked_account_rejects_even_with_right_password(make_user, make_service, client) -> None:
    user, password = make_user()
    run("usermod", "-L", user)
    auth = backend(make_service(PLAIN_UNIX))
    outcome = asyncio.run(verify(auth, user, password, client))
    assert outcome.verdict is Verdict.REJECT, outcome


def test_expired_account_is_refused_by_acct_mgmt(make_user, make_service, client, caplog) -> None:
    user, password = make_user()
    run("chage", "-E", "0", user)
    auth = backend(make_service(PLAIN_UNIX))
    outcome = asyncio.run(verify(auth, user, password, client))
    assert outcome.verdict is Verdict.REJECT
    assert outcome.reason.startswith("pam_acct_mgmt PAM_ACCT_EXPIRED:"), outcome.reason
    # pam_unix's PAM_ERROR_MSG reached the log through the conversation.
    warnings = [r for r in caplog.records if r.name == "ofmipd.pam" and r.levelname == "WARNING"]
    assert any("account has expired" in r.getMessage() for r in warnings), warnings


@pytest.mark.slow
def test_shipped_service_file_works_and_delays_failures(make_user, make_service, client) -> None:
    user, password = make_user()
    auth = backend(make_service(SHIPPED.read_text()))  # conf/pam.d/ofmipd, verbatim

    async def scenario() -> tuple[Outcome, Outcome, float]:
        good = await verify(auth, user, password, client)
        started = time.monotonic()
        bad = await verify(auth, user, "not the password", client)
        return good, bad, time.monotonic() - started

    good, bad, bad_seconds = asyncio.run(scenario())
    assert good.verdict is Verdict.ACCEPT, good
    assert bad.verdict is Verdict.REJECT, bad
    assert bad_seconds > 1.0  # pam_faildelay's 2 s (+/-25 %) is in force


@pytest.mark.slow
def test_empty_password_field_does_not_let_any_password_in(make_user, make_service, client) -> None:
    # Debian's common-auth says "nullok"; ofmipd passes PAM_DISALLOW_NULL_AUTHTOK.
    user, _ = make_user()
    run("passwd", "-d", user)
    auth = backend(make_service(SHIPPED.read_text()))
    outcome = asyncio.run(verify(auth, user, "anything at all", client))
    assert outcome.verdict is Verdict.REJECT, outcome


def test_client_address_decides_pam_access(make_user, make_service, client, tmp_path) -> None:
    user, password = make_user()
    access = tmp_path / "access.conf"
    access.write_text(f"- : {user} : 127.0.0.9\n+ : ALL : ALL\n")
    auth = backend(
        make_service(
            "auth required pam_unix.so nodelay\n"
            f"account required pam_access.so nodns accessfile={access}\n"
            "account required pam_unix.so\n"
        )
    )

    async def scenario() -> tuple[Outcome, Outcome]:
        far = await verify(auth, user, password, client.with_changes(ip="127.0.0.9"))
        near = await verify(auth, user, password, client)
        return far, near

    far, near = asyncio.run(scenario())
    assert far.verdict is Verdict.REJECT
    assert far.reason.startswith("pam_acct_mgmt PAM_PERM_DENIED:"), far.reason
    assert near.verdict is Verdict.ACCEPT, near


def test_modules_see_rhost_ruser_and_tty(make_user, make_service, client, tmp_path, caplog) -> None:
    user, password = make_user()
    seen = tmp_path / "seen"
    script = tmp_path / "record.sh"
    script.write_text(f'#!/bin/sh\necho "$PAM_RHOST|$PAM_RUSER|$PAM_TTY|$PAM_TYPE" >> {seen}\n')
    script.chmod(0o755)
    auth = backend(
        make_service(
            "auth optional pam_echo.so hello %U from %H on %t\n"
            "auth required pam_unix.so nodelay\n"
            f"account required pam_exec.so quiet {script}\n"
            "account required pam_unix.so\n"
        )
    )
    outcome = asyncio.run(verify(auth, user, password, client.with_changes(ip="127.0.0.5")))
    assert outcome.verdict is Verdict.ACCEPT, outcome
    assert seen.read_text() == f"127.0.0.5|{user}|smtp|account\n"
    infos = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert any(f"hello {user} from 127.0.0.5 on smtp" in m for m in infos), infos


def test_broken_service_tempfails(make_user, make_service, client) -> None:
    user, password = make_user()
    auth = backend(make_service("auth required pam_no_such_module.so\n" + PLAIN_UNIX))
    outcome = asyncio.run(verify(auth, user, password, client))
    assert outcome.verdict is Verdict.TEMPFAIL
    assert "PAM_MODULE_UNKNOWN" in outcome.reason


@pytest.mark.slow
def test_failing_logins_in_faildelay_delay_only_themselves(make_user, make_service, client) -> None:
    user, password = make_user()
    auth = backend(
        make_service(
            "auth optional pam_faildelay.so delay=2000000\n"
            "auth required pam_unix.so nodelay\n"
            "account required pam_unix.so\n"
        )
    )

    async def timed(secret: str) -> tuple[Outcome, float]:
        started = time.monotonic()
        outcome = await verify(auth, user, secret, client)
        return outcome, time.monotonic() - started

    async def scenario() -> tuple[list[tuple[Outcome, float]], tuple[Outcome, float]]:
        failing = [asyncio.create_task(timed(f"wrong {n}")) for n in range(3)]
        await asyncio.sleep(0.3)  # the three are now sleeping inside PAM
        assert not any(task.done() for task in failing)
        good = await timed(password)
        return [await task for task in failing], good

    (bad, good), lateness = asyncio.run(with_ticker(scenario()))
    assert good[0].verdict is Verdict.ACCEPT
    assert good[1] < 0.5, f"good login took {good[1]:.3f}s behind three failing ones"
    for outcome, seconds in bad:
        assert outcome.verdict is Verdict.REJECT
        assert seconds > 1.2  # each really sat in pam_faildelay
    assert lateness < 0.15, f"event loop stalled for {lateness * 1000:.0f} ms"


@pytest.mark.slow
def test_all_workers_busy_past_timeout_tempfails(make_user, make_service, client) -> None:
    user, password = make_user()
    service = make_service("auth optional pam_faildelay.so delay=2000000\n" + PLAIN_UNIX)
    auth = backend(service, workers=1, timeout=0.3)

    async def scenario() -> tuple[Decision, Decision]:
        # The queue's timeout becomes TEMPFAIL in the chain's containment.
        chain = Chain([auth])
        slow = asyncio.create_task(chain.authenticate(user.encode(), b"wrong", client))
        await asyncio.sleep(0.1)
        queued = await chain.authenticate(user.encode(), password.encode(), client)
        return await slow, queued

    slow, queued = asyncio.run(scenario())
    assert slow.verdict is Verdict.REJECT
    assert queued.verdict is Verdict.TEMPFAIL
    assert "busy" in queued.reason


def test_concurrent_logins_each_get_their_own_answer(make_user, make_service, client) -> None:
    users = [make_user() for _ in range(3)]
    auth = backend(make_service(PLAIN_UNIX), workers=4)

    async def scenario() -> list[tuple[bool, Outcome]]:
        attempts = [(n % 2 == 0, users[n % 3]) for n in range(24)]
        outcomes = await asyncio.gather(
            *(verify(auth, u, p if good else p + "!", client) for good, (u, p) in attempts)
        )
        return [(good, o) for (good, _), o in zip(attempts, outcomes, strict=True)]

    for good, outcome in asyncio.run(scenario()):
        assert outcome.verdict is (Verdict.ACCEPT if good else Verdict.REJECT), outcome


def test_conversation_answers_prompts_and_logs_messages(caplog) -> None:
    # Whatever level an earlier test in this worker left on the logger, INFO is captured.
    caplog.set_level(logging.INFO, logger="ofmipd.pam")
    password = f"pw {secrets.token_hex(6)}"
    PASSWORDS.append(password)
    converse = pam_backend._conversation("svc", "alice", b"alice", password.encode())
    styles_texts = [
        (PAM_PROMPT_ECHO_ON, b"login: "),
        (PAM_PROMPT_ECHO_OFF, b"Password: "),
        (PAM_TEXT_INFO, b"welcome"),
        (PAM_ERROR_MSG, f"module says {password}".encode()),
        (PAM_PROMPT_ECHO_OFF, b"Password again: "),
    ]
    messages = [PamMessage(style, c_char_p(text)) for style, text in styles_texts]
    array = (POINTER(PamMessage) * len(messages))(*(pointer(m) for m in messages))
    reply = POINTER(PamResponse)()
    code = converse(len(messages), cast(array, POINTER(POINTER(PamMessage))), byref(reply), None)
    assert code == 0
    answers = [reply[i].resp for i in range(len(messages))]
    assert answers == [b"alice", password.encode(), None, None, password.encode()]
    for i in (0, 1, 4):  # PAM would free these; here the test does
        pam_backend._free(c_void_p.from_address(addressof(reply[i])).value)
    pam_backend._free(cast(reply, c_void_p))
    logged = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "ofmipd.pam"]
    assert ("INFO", "PAM svc for alice: welcome") in logged
    assert ("WARNING", "PAM svc for alice: module says <redacted>") in logged


def test_flag_and_toml_configuration(make_service) -> None:
    service = make_service(PLAIN_UNIX)
    from_flag = create_backend(BackendSpec("pam", service))
    assert (from_flag.name, from_flag.target) == ("pam", f"PAM service {service}")
    from_toml = create_backend(
        BackendSpec("pam", options={"service": service, "workers": 2, "timeout": 5})
    )
    assert isinstance(from_toml, pam_backend.PamAuth)
    assert (from_toml.offload.workers, from_toml.offload.max_queue_age) == (2, 5.0)
    bad_options: list[dict[str, object]] = [
        {},
        {"service": "../etc/passwd"},
        {"service": f"ofmipd-missing-{secrets.token_hex(4)}"},
        {"service": service, "workers": 0},
        {"service": service, "workers": True},
        {"service": service, "timeout": -1},
        {"service": service, "colour": "blue"},
    ]
    for options in bad_options:
        with pytest.raises(ConfigError) as error:
            create_backend(BackendSpec("pam", options=options))
        assert "\n" not in str(error.value)


def test_chain_maps_pam_verdicts(make_user, make_service, client) -> None:
    user, password = make_user()
    chain = Chain([backend(make_service(PLAIN_UNIX))])
    good = asyncio.run(chain.authenticate(user.encode(), password.encode(), client))
    bad = asyncio.run(chain.authenticate(user.encode(), b"nope", client))
    assert (good.verdict, bad.verdict) == (Verdict.ACCEPT, Verdict.REJECT)
    assert good.user == user


# A PAM module that lower-cases PAM_USER, as modules that fold case or map aliases do.
LOWERCASE_MODULE = r"""
#include <ctype.h>
#include <stdlib.h>
#include <string.h>
#include <security/pam_modules.h>

PAM_EXTERN int pam_sm_authenticate(pam_handle_t *pamh, int flags, int argc, const char **argv) {
    const void *item = NULL;
    if (pam_get_item(pamh, PAM_USER, &item) != PAM_SUCCESS || item == NULL)
        return PAM_AUTH_ERR;
    char *lower = strdup((const char *)item);
    if (lower == NULL)
        return PAM_BUF_ERR;
    for (char *c = lower; *c; c++)
        *c = (char)tolower((unsigned char)*c);
    int code = pam_set_item(pamh, PAM_USER, lower);
    free(lower);
    return code;
}

PAM_EXTERN int pam_sm_setcred(pam_handle_t *pamh, int flags, int argc, const char **argv) {
    return PAM_IGNORE;
}
"""


@pytest.fixture
def lowercase_module(tmp_path: Path) -> Path:
    source = tmp_path / "pam_lowercase.c"
    source.write_text(LOWERCASE_MODULE)
    module = tmp_path / "pam_lowercase.so"
    run("gcc", "-shared", "-fPIC", "-Wall", "-o", str(module), str(source), "-lpam")
    return module


def test_accept_names_the_user_pam_authenticated_not_the_typed_one(
    make_user, make_service, lowercase_module, client
) -> None:
    user, password = make_user()
    service = make_service(
        f"auth required {lowercase_module}\n"
        "auth required pam_unix.so nodelay\n"
        "account required pam_unix.so\n"
    )
    typed = user.upper()
    outcome = asyncio.run(verify(backend(service), typed, password, client))
    assert outcome.verdict is Verdict.ACCEPT, outcome
    assert outcome.user == user
    decision = asyncio.run(
        Chain([backend(service)]).authenticate(typed.encode(), password.encode(), client)
    )
    assert (decision.verdict, decision.user) == (Verdict.ACCEPT, user)
    # Without the module the typed name is no user: the module really did the mapping.
    plain = asyncio.run(verify(backend(make_service(PLAIN_UNIX)), typed, password, client))
    assert plain.verdict is Verdict.REJECT


def test_median_latency_of_a_good_login_never_stalls_the_loop(
    make_user, make_service, client
) -> None:
    user, password = make_user()
    auth = backend(make_service(SHIPPED.read_text()))  # pam_faildelay: 2 s per failure

    async def scenario() -> tuple[list[float], Outcome, float]:
        started = time.perf_counter()
        failing = asyncio.create_task(verify(auth, user, "wrong", client))
        times = []
        for _ in range(20):
            begun = time.perf_counter()
            outcome = await verify(auth, user, password, client)
            times.append(time.perf_counter() - begun)
            assert outcome.verdict is Verdict.ACCEPT
        bad = await failing
        return times, bad, time.perf_counter() - started

    (times, bad, seconds), stall = asyncio.run(with_ticker(scenario()))
    median = statistics.median(times)
    print(f"\nPAM verify() median for a good password: {median * 1000:.1f} ms")
    assert median < 1.0
    # The failure sat in pam_faildelay meanwhile; only a thread kept the loop turning.
    assert bad.verdict is Verdict.REJECT and seconds > 1.2, (bad, seconds)
    assert stall < 0.5, f"event loop stalled for {stall * 1000:.0f} ms"


def test_no_test_service_or_user_is_left_behind() -> None:
    # What the fixtures make, they remove, even when the test fails: checked on the
    # fixtures' own helpers, so the answer does not depend on which tests ran before.
    def present(user: str, service: str) -> tuple[bool, bool]:
        names = [line.split(":", 1)[0] for line in Path("/etc/passwd").read_text().splitlines()]
        return user in names, (Path("/etc/pam.d") / service).exists()

    with pytest.raises(RuntimeError), system_users() as make, pam_services() as make_svc:
        user, _ = make()
        service = make_svc(PLAIN_UNIX)
        assert present(user, service) == (True, True)
        raise RuntimeError("a failing test")
    assert present(user, service) == (False, False)
