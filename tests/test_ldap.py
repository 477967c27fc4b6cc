"""The LDAP authenticator against a real private slapd: binds, searches, outages, TLS."""

from __future__ import annotations

import asyncio
import shutil
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from auth_backends import BackendSpec
from auth_backends import create as create_backend
from auth_backends.ldap import LdapAuth
from ofmipd.auth import Chain, Outcome, Secret, Verdict
from ofmipd.errors import ConfigError
from ofmipd.identity import ClientIdentity
from tests import ldap_server
from tests.conftest import free_port
from tests.ldap_server import BASE, PEOPLE, Slapd, make_ca_and_cert, start_slapd
from tests.loop_ticker import with_ticker

# The private slapd fixtures (function-scoped, one per module, and with TLS).
slapd = ldap_server.slapd
slapd_module = ldap_server.slapd_module
slapd_tls = ldap_server.slapd_tls

TEMPLATE = f"uid=%s,{PEOPLE}"
FILTER = "(&(objectClass=inetOrgPerson)(|(uid=%s)(mail=%s)))"
# Each must stay one literal user name: no wildcard, no extra filter term, no extra RDN.
INJECTIONS = ("*", ")(uid=*", "admin,ou=x", "a\\00b", "bob,ou=staff", "ali*", "*)(|(uid=*")
FAST = {"network_timeout": 2, "timeout": 2}


def verify(backend: LdapAuth, user: str, password: str, client: ClientIdentity) -> Outcome:
    outcome = asyncio.run(backend.verify(user, Secret(password.encode()), client))
    if password:
        assert password not in outcome.reason  # reasons never carry the password
    return outcome


@pytest.fixture
def make() -> Iterator[Callable[..., LdapAuth]]:
    """Build backends through the registry, as ofmipd does; close them afterwards."""
    made: list[LdapAuth] = []

    def build(arg: str | None = None, **options: Any) -> LdapAuth:
        backend = create_backend(BackendSpec("ldap", arg=arg, options=options))
        assert isinstance(backend, LdapAuth)
        made.append(backend)
        return backend

    yield build
    for backend in made:
        asyncio.run(backend.close())


def searcher(make: Callable[..., LdapAuth], server: Slapd, **options: Any) -> LdapAuth:
    settings: dict[str, Any] = {
        "uri": server.uri,
        "bind_dn": server.service_dn,
        "bind_password_file": str(server.service_password_file),
        "base": PEOPLE,
        "filter": FILTER,
        **FAST,
    }
    settings.update(options)
    return make(**settings)


# ---- configuration ----


def test_flag_url_gives_server_and_url_decoded_template(make: Callable[..., LdapAuth]) -> None:
    backend = make("ldap://ldap.example.org:3389/uid=%s,ou=people%2Cdc=example,dc=org")
    assert backend.settings.uris == ("ldap://ldap.example.org:3389",)
    assert backend.settings.dn_template == "uid=%s,ou=people,dc=example,dc=org"
    assert backend.name == "ldap"
    assert backend.target == "ldap://ldap.example.org:3389 uid=%s,ou=people,dc=example,dc=org"
    assert make("ldaps://ldap.example.org/cn=%s,dc=org").settings.uris == (
        "ldaps://ldap.example.org",
    )


@pytest.mark.parametrize(
    ("arg", "options", "complaint"),
    [
        ("ldap://h/uid=user,dc=org", {}, "no %s"),
        ("ldap:///uid=%s,dc=org", {}, "names no host"),
        ("ldap://h/uid=%s,,=dc", {}, "not a valid DN"),
        ("ldap://h/uid=%s,dc=org?cn?sub", {}, "query"),
        ("ldap://h/uid=%s,dc=org", {"uri": "ldap://x"}, "already gives"),
        (None, {"uri": "http://h", "dn_template": "uid=%s"}, "not an ldap"),
        (None, {"uri": "ldap://h/dc=org", "dn_template": "uid=%s"}, "dn_template"),
        (None, {"uri": "ldap://h:99999", "dn_template": "uid=%s"}, "bad port"),
        (None, {"uri": ["ldap://h", "ldap://h"], "dn_template": "uid=%s"}, "twice"),
        (None, {"uri": "ldap://h"}, "either dn_template or base"),
        (None, {"uri": "ldap://h", "dn_template": "uid=%s", "base": "dc=org"}, "either"),
        (None, {"uri": "ldap://h", "dn_template": "uid=%s", "filter": "(uid=%s)"}, "search"),
        (None, {"uri": "ldap://h", "base": "dc=org", "scope": "tree"}, "scope"),
        (None, {"uri": "ldap://h", "base": "dc=org", "filter": "(uid=x)"}, "no %s"),
        (None, {"uri": "ldap://h", "base": "dc=org", "filter": "(uid=%s"}, "parenthesised"),
        (None, {"uri": "ldap://h", "base": "dc=org", "bind_dn": "cn=x"}, "go together"),
        (
            None,
            {"uri": "ldap://h", "base": "dc=org", "bind_dn": "cn=x", "bind_password_file": "/nx"},
            "/nx",
        ),
        (None, {"uri": "ldaps://h", "base": "dc=org", "starttls": True}, "twice"),
        (None, {"uri": "ldap://h", "base": "dc=org", "ca_file": "/etc/hostname"}, "needs"),
        (None, {"uri": "ldaps://h", "base": "dc=org", "ca_file": "/nonexistent"}, "readable"),
        (None, {"uri": "ldap://h", "base": "dc=org", "timeout": 0}, "timeout"),
        (None, {"uri": "ldap://h", "base": "dc=org", "workers": 0}, "workers"),
        (None, {"uri": "ldap://h", "base": "dc=org", "pasword": "x"}, "unknown setting"),
    ],
)
def test_bad_configuration_is_one_line_config_error(
    make: Callable[..., LdapAuth], arg: str | None, options: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        make(arg, **options)
    assert complaint in str(caught.value)
    assert "\n" not in str(caught.value)


def test_empty_service_password_file_is_refused(
    make: Callable[..., LdapAuth], tmp_path: Path
) -> None:
    empty = tmp_path / "empty.pw"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        make(uri="ldap://h", base="dc=org", bind_dn="cn=x", bind_password_file=str(empty))


# ---- DN template ----


def test_dn_template_accepts_good_and_rejects_bad_password(
    make: Callable[..., LdapAuth], slapd_module: Slapd, client: ClientIdentity
) -> None:
    backend = make(f"{slapd_module.uri}/{TEMPLATE}", **FAST)
    assert backend.target == f"{slapd_module.uri} {TEMPLATE}"
    good = verify(backend, "alice", "alice-pw", client)
    assert good.verdict is Verdict.ACCEPT
    assert good.reason == f"LDAP bind as uid=alice,{PEOPLE}"
    bad = verify(backend, "alice", "bob-pw", client)
    assert (bad.verdict, bad.reason) == (Verdict.REJECT, "LDAP invalidCredentials")
    unknown = verify(backend, "nobody", "alice-pw", client)
    assert (unknown.verdict, unknown.reason) == (Verdict.REJECT, "LDAP invalidCredentials")


@pytest.mark.parametrize("user", INJECTIONS)
def test_dn_template_escapes_user_name(
    make: Callable[..., LdapAuth], slapd_module: Slapd, client: ClientIdentity, user: str
) -> None:
    # Unescaped, "bob,ou=staff" would bind as uid=bob,ou=staff,ou=people,... whose
    # password is among these; escaped it is one RDN value that names no entry.
    backend = make(f"{slapd_module.uri}/{TEMPLATE}", **FAST)
    for entry in slapd_module.all_users:
        outcome = verify(backend, user, entry.password, client)
        assert outcome.verdict is Verdict.REJECT, (user, entry.dn, outcome)
        assert outcome.reason.startswith("LDAP ")


def test_user_name_that_cannot_be_in_the_dn_is_rejected_not_tempfailed(
    make: Callable[..., LdapAuth], slapd_module: Slapd, client: ClientIdentity
) -> None:
    # mail is IA5String: a non-ASCII user name makes slapd answer invalidDNSyntax.
    backend = make(f"{slapd_module.uri}/mail=%s,{PEOPLE}", **FAST)
    outcome = verify(backend, "jürgen", "alice-pw", client)
    assert (outcome.verdict, outcome.reason) == (Verdict.REJECT, "LDAP invalidDNSyntax")


def test_empty_password_is_refused_without_a_bind(
    make: Callable[..., LdapAuth], slapd: Slapd, client: ClientIdentity
) -> None:
    # slapd would treat DN + empty password as an anonymous bind and answer success.
    backend = make(f"{slapd.uri}/{TEMPLATE}", **FAST)
    alice = slapd.users["alice"].dn
    outcome = verify(backend, "alice", "", client)
    assert outcome.verdict is Verdict.REJECT
    assert "RFC 4513" in outcome.reason
    assert slapd.binds(alice) == 0
    searching = searcher(make, slapd)
    assert verify(searching, "alice", "", client).verdict is Verdict.REJECT
    slapd.stop()  # no server needed to say no
    assert verify(backend, "alice", "", client).verdict is Verdict.REJECT
    assert slapd.binds(alice) == 0


def test_dn_template_outage_tempfails_and_recovers_with_same_backend(
    make: Callable[..., LdapAuth], slapd: Slapd, client: ClientIdentity
) -> None:
    backend = make(f"{slapd.uri}/{TEMPLATE}", **FAST)
    assert verify(backend, "alice", "alice-pw", client).verdict is Verdict.ACCEPT
    slapd.stop()
    started = time.monotonic()
    down = verify(backend, "alice", "alice-pw", client)
    assert down.verdict is Verdict.TEMPFAIL
    assert down.reason == f"LDAP serverDown at {slapd.uri}"
    assert time.monotonic() - started < 2 + 2 + 3  # network_timeout + timeout + slack
    # Wrong password during the outage is still "try later": the server never said no.
    assert verify(backend, "alice", "wrong", client).verdict is Verdict.TEMPFAIL
    slapd.start()
    assert verify(backend, "alice", "alice-pw", client).verdict is Verdict.ACCEPT


@pytest.mark.slow
def test_hung_server_times_out_then_recovers(
    make: Callable[..., LdapAuth], slapd: Slapd, client: ClientIdentity
) -> None:
    template = make(f"{slapd.uri}/{TEMPLATE}", network_timeout=1, timeout=1)
    searching = searcher(make, slapd, network_timeout=1, timeout=1)
    assert verify(searching, "alice", "alice-pw", client).verdict is Verdict.ACCEPT
    slapd.pause()  # the kernel still accepts connections; nothing answers
    try:
        for backend in (template, searching):
            started = time.monotonic()
            outcome = verify(backend, "alice", "alice-pw", client)
            elapsed = time.monotonic() - started
            assert outcome.verdict is Verdict.TEMPFAIL
            assert outcome.reason == f"LDAP timeout at {slapd.uri}"
            assert elapsed < 1 + 1 + 3, elapsed
    finally:
        slapd.resume()
    assert verify(template, "alice", "alice-pw", client).verdict is Verdict.ACCEPT
    assert verify(searching, "alice", "alice-pw", client).verdict is Verdict.ACCEPT


def test_failover_to_second_uri_when_first_is_down(
    make: Callable[..., LdapAuth], slapd_module: Slapd, client: ClientIdentity
) -> None:
    dead = f"ldap://127.0.0.1:{free_port()}"
    backend = make(uri=[dead, slapd_module.uri], dn_template=TEMPLATE, **FAST)
    assert backend.target == f"{dead} {slapd_module.uri} {TEMPLATE}"
    assert verify(backend, "alice", "alice-pw", client).verdict is Verdict.ACCEPT
    bad = verify(backend, "alice", "wrong", client)
    assert (bad.verdict, bad.reason) == (Verdict.REJECT, "LDAP invalidCredentials")
    both_dead = make(uri=[dead, f"ldap://127.0.0.1:{free_port()}"], dn_template=TEMPLATE, **FAST)
    outcome = verify(both_dead, "alice", "alice-pw", client)
    assert outcome.verdict is Verdict.TEMPFAIL
    assert outcome.reason.count("LDAP serverDown at ") == 2


# ---- search-then-bind ----


def test_search_then_bind_by_uid_or_mail(
    make: Callable[..., LdapAuth], slapd_module: Slapd, client: ClientIdentity
) -> None:
    backend = searcher(make, slapd_module)
    assert backend.target == f"{slapd_module.uri} sub {PEOPLE} {FILTER}"
    for user in ("alice", "alice@example.org", "ALICE"):
        outcome = verify(backend, user, "alice-pw", client)
        assert outcome.verdict is Verdict.ACCEPT, user
        assert outcome.reason == f"LDAP bind as uid=alice,{PEOPLE}"
    bad = verify(backend, "alice", "bob-pw", client)
    assert (bad.verdict, bad.reason) == (Verdict.REJECT, "LDAP invalidCredentials")
    unknown = verify(backend, "nobody", "alice-pw", client)
    assert (unknown.verdict, unknown.reason) == (Verdict.REJECT, "LDAP search found no such user")


def test_search_with_two_matches_is_ambiguous(
    make: Callable[..., LdapAuth], slapd_module: Slapd, client: ClientIdentity
) -> None:
    backend = searcher(make, slapd_module)
    shared = verify(backend, "shared@example.org", "carol-pw", client)
    assert shared.verdict is Verdict.REJECT
    assert "ambiguous" in shared.reason
    # Two bobs below ou=people (one in ou=staff): scope decides whether that is ambiguous.
    assert "ambiguous" in verify(backend, "bob", "bob-pw", client).reason
    one_level = searcher(make, slapd_module, scope="one")
    assert verify(one_level, "bob", "bob-pw", client).verdict is Verdict.ACCEPT


@pytest.mark.parametrize("user", INJECTIONS)
def test_search_escapes_user_name(
    make: Callable[..., LdapAuth], slapd_module: Slapd, client: ClientIdentity, user: str
) -> None:
    # Unescaped, "*" and ")(uid=*" would match everyone (ambiguous) and "ali*" would
    # find alice; escaped, each is a literal name that matches no entry.
    backend = searcher(make, slapd_module)
    for entry in slapd_module.all_users:
        outcome = verify(backend, user, entry.password, client)
        assert (outcome.verdict, outcome.reason) == (
            Verdict.REJECT,
            "LDAP search found no such user",
        ), (user, entry.dn)


def test_anonymous_search_then_bind(
    make: Callable[..., LdapAuth], slapd_module: Slapd, client: ClientIdentity
) -> None:
    backend = make(uri=slapd_module.uri, base=BASE, scope="one", filter="(uid=%s)", **FAST)
    assert verify(backend, "alice", "alice-pw", client).verdict is Verdict.REJECT  # not in BASE
    backend = make(uri=slapd_module.uri, base=PEOPLE, scope="one", **FAST)  # default (uid=%s)
    assert verify(backend, "alice", "alice-pw", client).verdict is Verdict.ACCEPT


def test_refused_service_account_is_a_tempfail(
    make: Callable[..., LdapAuth], slapd_module: Slapd, client: ClientIdentity, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong.pw"
    wrong.write_text("not-the-service-password\n")
    backend = searcher(make, slapd_module, bind_password_file=str(wrong))
    outcome = verify(backend, "alice", "alice-pw", client)
    assert outcome.verdict is Verdict.TEMPFAIL
    assert outcome.reason == (
        f"LDAP invalidCredentials for the service account {slapd_module.service_dn}"
        f" at {slapd_module.uri}"
    )


def test_service_connection_is_reused(
    make: Callable[..., LdapAuth], slapd: Slapd, client: ClientIdentity
) -> None:
    backend = searcher(make, slapd, workers=1)
    before = slapd.binds(slapd.service_dn)
    assert verify(backend, "alice", "alice-pw", client).verdict is Verdict.ACCEPT
    (pooled,) = backend._pool[slapd.uri]
    for user, password in [("bob@example.org", "bob-pw"), ("carol", "x"), ("nobody", "x")] * 3:
        verify(backend, user, password, client)
    assert backend._pool[slapd.uri] == [pooled]
    assert slapd.binds(slapd.service_dn) - before == 1


def test_search_outage_tempfails_and_service_connection_is_reestablished(
    make: Callable[..., LdapAuth], slapd: Slapd, client: ClientIdentity
) -> None:
    backend = searcher(make, slapd)
    assert verify(backend, "alice", "alice-pw", client).verdict is Verdict.ACCEPT
    before = slapd.binds(slapd.service_dn)
    slapd.stop()
    started = time.monotonic()
    down = verify(backend, "alice", "alice-pw", client)
    assert (down.verdict, down.reason) == (Verdict.TEMPFAIL, f"LDAP serverDown at {slapd.uri}")
    assert time.monotonic() - started < 2 + 2 + 3
    slapd.start()
    assert verify(backend, "alice", "alice-pw", client).verdict is Verdict.ACCEPT
    assert verify(backend, "bob@example.org", "bob-pw", client).verdict is Verdict.ACCEPT
    assert slapd.binds(slapd.service_dn) - before == 1
    # A restart between two logins leaves a dead connection in the pool; the next login
    # must not pay for it with a TEMPFAIL.
    slapd.stop()
    slapd.start()
    assert verify(backend, "alice", "alice-pw", client).verdict is Verdict.ACCEPT
    assert slapd.binds(slapd.service_dn) - before == 2


def test_search_fails_over_between_two_slapds(
    make: Callable[..., LdapAuth], tmp_path: Path, client: ClientIdentity
) -> None:
    first = start_slapd(tmp_path / "first")
    second = start_slapd(tmp_path / "second")
    try:
        backend = searcher(make, first, uri=[first.uri, second.uri])
        assert verify(backend, "alice", "alice-pw", client).verdict is Verdict.ACCEPT
        assert first.binds(f"uid=alice,{PEOPLE}") == 1
        first.stop()
        assert verify(backend, "alice", "alice-pw", client).verdict is Verdict.ACCEPT
        assert second.binds(f"uid=alice,{PEOPLE}") == 1
        bad = verify(backend, "alice", "wrong", client)
        assert (bad.verdict, bad.reason) == (Verdict.REJECT, "LDAP invalidCredentials")
        second.stop()
        outcome = verify(backend, "alice", "alice-pw", client)
        assert outcome.verdict is Verdict.TEMPFAIL
        assert first.uri in outcome.reason and second.uri in outcome.reason
        first.start()
        assert verify(backend, "alice", "alice-pw", client).verdict is Verdict.ACCEPT
    finally:
        first.stop()
        second.stop()
        shutil.rmtree(tmp_path / "first", ignore_errors=True)
        shutil.rmtree(tmp_path / "second", ignore_errors=True)


# ---- the canonical name ----

# Each binds as alice through slapd's matching rules (case and compatibility folding).
ALICE_VARIANTS = ("alice", "ALICE", "\uff41\uff4c\uff49\uff43\uff45", "AL\u0130CE")


@pytest.mark.parametrize("typed", ALICE_VARIANTS)
def test_accept_names_the_entrys_uid_not_the_typed_name(
    make: Callable[..., LdapAuth], slapd_module: Slapd, client: ClientIdentity, typed: str
) -> None:
    template = make(f"{slapd_module.uri}/{TEMPLATE}", **FAST)
    searching = searcher(make, slapd_module)
    for backend in (template, searching):
        outcome = verify(backend, typed, "alice-pw", client)
        assert (outcome.verdict, outcome.user) == (Verdict.ACCEPT, "alice"), outcome
        assert outcome.reason == f"LDAP bind as uid=alice,{PEOPLE}"


def test_search_by_mail_names_the_uid_the_filter_tests_first(
    make: Callable[..., LdapAuth], slapd_module: Slapd, client: ClientIdentity
) -> None:
    backend = searcher(make, slapd_module)  # (|(uid=%s)(mail=%s)): uid names the user
    assert backend.settings.user_attribute == "uid"
    outcome = verify(backend, "BOB@example.org", "bob-pw", client)
    assert (outcome.verdict, outcome.user) == (Verdict.ACCEPT, "bob")
    by_mail = searcher(make, slapd_module, filter="(mail=%s)")
    assert by_mail.settings.user_attribute == "mail"
    assert verify(by_mail, "BOB@example.org", "bob-pw", client).user == "bob@example.org"
    chosen = searcher(make, slapd_module, filter="(mail=%s)", user_attribute="uid")
    assert verify(chosen, "bob@example.org", "bob-pw", client).user == "bob"


@pytest.mark.parametrize(
    ("options", "attribute"),
    [
        ({"dn_template": f"uid=%s,{PEOPLE}"}, "uid"),
        ({"dn_template": f"cn=%s+sn=x,{PEOPLE}"}, "cn"),
        ({"dn_template": f"uid=%s,{PEOPLE}", "user_attribute": "mail"}, "mail"),
        ({"base": PEOPLE}, "uid"),
        ({"base": PEOPLE, "filter": "(&(objectClass=person)(mail=%s))"}, "mail"),
        ({"base": PEOPLE, "filter": "(|(cn~=%s)(uid=%s))"}, "cn"),
        ({"base": PEOPLE, "filter": "(sAMAccountName:caseExactMatch:=%s)"}, "sAMAccountName"),
    ],
)
def test_user_attribute_default_and_override(
    make: Callable[..., LdapAuth], options: dict[str, str], attribute: str
) -> None:
    assert make(uri="ldap://h", **options).settings.user_attribute == attribute


@pytest.mark.parametrize(
    "options",
    [
        {"base": PEOPLE, "filter": "(&(objectClass=person)%s)"},
        {"base": PEOPLE, "user_attribute": "uid,x"},
        {"base": PEOPLE, "user_attribute": ""},
    ],
)
def test_user_attribute_that_cannot_name_a_user_stops_start_up(
    make: Callable[..., LdapAuth], options: dict[str, str]
) -> None:
    with pytest.raises(
        ConfigError, match="set user_attribute|not an attribute name|user_attribute must be"
    ):
        make(uri="ldap://h", **options)


def test_entry_without_the_name_attribute_tempfails_never_the_typed_name(
    make: Callable[..., LdapAuth], slapd_module: Slapd, client: ClientIdentity
) -> None:
    template = make(f"{slapd_module.uri}/{TEMPLATE}", user_attribute="employeeNumber", **FAST)
    searching = searcher(make, slapd_module, user_attribute="employeeNumber")
    for backend in (template, searching):
        outcome = verify(backend, "alice", "alice-pw", client)
        assert (outcome.verdict, outcome.user) == (Verdict.TEMPFAIL, None), outcome
        assert "no single employeeNumber value" in outcome.reason
        # A wrong password is still a wrong password.
        assert verify(backend, "alice", "wrong", client).verdict is Verdict.REJECT


def user_binds(server: Slapd) -> int:
    """Simple binds slapd has logged, other than the service account's."""
    service = f'BIND dn="{server.service_dn}"'.lower()
    return sum(
        'BIND dn="' in line and "method=128" in line and service not in line.lower()
        for line in server.log_text().splitlines()
    )


def test_search_then_bind_spends_a_bind_on_unknown_users(
    make: Callable[..., LdapAuth], slapd: Slapd, client: ClientIdentity
) -> None:
    # A known user with a wrong password costs a search and a bind; a user the search does
    # not find (or finds twice) must cost the same, or timing tells who exists.
    backend = searcher(make, slapd)
    verify(backend, "alice", "alice-pw", client)  # the service connection is pooled now
    before = user_binds(slapd)
    assert verify(backend, "alice", "wrong", client).verdict is Verdict.REJECT
    assert user_binds(slapd) - before == 1
    for unknown in ("nobody", "shared@example.org"):
        before = user_binds(slapd)
        outcome = verify(backend, unknown, "wrong", client)
        assert outcome.verdict is Verdict.REJECT
        assert outcome.reason.startswith("LDAP search"), outcome.reason
        assert user_binds(slapd) - before == 1, unknown
    # The dummy DN lies under base and is nobody: even the right password of an entry
    # cannot make it succeed.
    assert verify(backend, "nobody", "alice-pw", client).verdict is Verdict.REJECT


# ---- TLS ----


def test_starttls_and_ldaps_with_ca_file(
    make: Callable[..., LdapAuth], slapd_tls: Slapd, client: ClientIdentity
) -> None:
    ca_file = str(slapd_tls.ca_file)
    starttls = make(f"{slapd_tls.uri}/{TEMPLATE}", starttls=True, ca_file=ca_file, **FAST)
    assert verify(starttls, "alice", "alice-pw", client).verdict is Verdict.ACCEPT
    assert "STARTTLS" in slapd_tls.log_text()
    implicit = make(f"{slapd_tls.ldaps_uri}/{TEMPLATE}", ca_file=ca_file, **FAST)
    assert verify(implicit, "alice", "alice-pw", client).verdict is Verdict.ACCEPT
    # slapd logs each bind's security strength factor: ssf=0 would mean cleartext.
    binds = [line for line in slapd_tls.log_text().splitlines() if "mech=SIMPLE" in line]
    alice = [line for line in binds if f'dn="uid=alice,{PEOPLE}"' in line]
    assert len(alice) == 2
    assert not [line for line in alice if line.endswith(" ssf=0")], alice
    bad = verify(implicit, "alice", "wrong", client)
    assert (bad.verdict, bad.reason) == (Verdict.REJECT, "LDAP invalidCredentials")
    searching = searcher(make, slapd_tls, starttls=True, ca_file=ca_file)
    assert verify(searching, "alice", "alice-pw", client).verdict is Verdict.ACCEPT


def test_tls_with_an_untrusted_certificate_never_binds(
    make: Callable[..., LdapAuth], slapd_tls: Slapd, client: ClientIdentity, tmp_path: Path
) -> None:
    other_ca, _, _ = make_ca_and_cert(tmp_path / "other", "other")
    for arg, options in (
        (f"{slapd_tls.uri}/{TEMPLATE}", {"starttls": True, "ca_file": str(other_ca)}),
        (f"{slapd_tls.ldaps_uri}/{TEMPLATE}", {"ca_file": str(other_ca)}),
    ):
        backend = make(arg, **options, **FAST)
        outcome = verify(backend, "alice", "alice-pw", client)
        assert outcome.verdict is Verdict.TEMPFAIL, arg
        assert outcome.reason.startswith("LDAP "), outcome.reason
    assert slapd_tls.binds(f"uid=alice,{PEOPLE}") == 0


# ---- through the chain, concurrency, latency ----


def test_chain_maps_ldap_outcomes(
    make: Callable[..., LdapAuth], slapd: Slapd, client: ClientIdentity
) -> None:
    chain = Chain([make(f"{slapd.uri}/{TEMPLATE}", **FAST)], timeout=20)
    decision = asyncio.run(chain.authenticate(b"alice", b"alice-pw", client))
    assert (decision.verdict, decision.user) == (Verdict.ACCEPT, "alice")
    decision = asyncio.run(chain.authenticate(b"alice", b"wrong", client))
    assert (decision.verdict, decision.reason) == (Verdict.REJECT, "LDAP invalidCredentials")
    slapd.stop()
    decision = asyncio.run(chain.authenticate(b"alice", b"alice-pw", client))
    assert decision.verdict is Verdict.TEMPFAIL
    assert decision.attempts[0].target == f"{slapd.uri} {TEMPLATE}"


def test_concurrent_logins_share_the_pool(
    make: Callable[..., LdapAuth], slapd_module: Slapd, client: ClientIdentity
) -> None:
    backend = searcher(make, slapd_module, workers=3, timeout=10)
    logins = [("alice", "alice-pw", Verdict.ACCEPT), ("bob@example.org", "bob-pw", Verdict.ACCEPT)]
    logins += [("carol", "wrong", Verdict.REJECT), ("nobody", "x", Verdict.REJECT)]
    logins *= 6

    async def all_at_once() -> list[Outcome]:
        return await asyncio.gather(
            *(backend.verify(u, Secret(p.encode()), client) for u, p, _ in logins)
        )

    outcomes = asyncio.run(all_at_once())
    assert [o.verdict for o in outcomes] == [expected for _, _, expected in logins]
    assert len(backend._pool[slapd_module.uri]) <= 3


def test_median_verify_latency_never_stalls_the_loop(
    make: Callable[..., LdapAuth], slapd_module: Slapd, client: ClientIdentity
) -> None:
    backend = make(f"{slapd_module.uri}/{TEMPLATE}", **FAST)
    secret = Secret(b"alice-pw")
    # A server that accepts the connection (the kernel does) and never answers the bind.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        hung = make(f"ldap://127.0.0.1:{silent.getsockname()[1]}/{TEMPLATE}", timeout=1)

        async def timed() -> tuple[list[float], Outcome, float]:
            started = time.perf_counter()
            waiting = asyncio.create_task(hung.verify("alice", secret, client))
            times = []
            for _ in range(20):
                begun = time.perf_counter()
                outcome = await backend.verify("alice", secret, client)
                times.append((time.perf_counter() - begun) * 1000)
                assert outcome.verdict is Verdict.ACCEPT
            stuck = await waiting
            return times, stuck, time.perf_counter() - started

        (times, stuck, seconds), stall = asyncio.run(with_ticker(timed()))
    median = statistics.median(times)
    print(f"\nLDAP DN-template verify() median over 20 calls: {median:.2f} ms")
    assert median < 500
    # The hung bind waited out its timeout meanwhile, in a thread: the loop kept turning.
    assert stuck.verdict is Verdict.TEMPFAIL and seconds > 0.8, (stuck, seconds)
    assert stall < 0.5, f"event loop stalled for {stall * 1000:.0f} ms"
