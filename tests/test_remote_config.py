"""Remote IMAP/POP3 authenticators: URL and TOML parsing, the ipauthmap format, verdict tables.

Pure functions only; the tests against a real Dovecot are in the other test_remote_* files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from auth_backends import BackendSpec, create, kind_for_url, spec_from_flag
from auth_backends.imap import ImapLogin, astring
from auth_backends.imap import _verdict as imap_verdict
from auth_backends.ipauthmap import default_map_path, parse_map
from auth_backends.pop3 import Pop3Login
from auth_backends.pop3 import _verdict as pop3_verdict
from ofmipd.auth import Verdict
from ofmipd.errors import ConfigError


def from_flag(url: str):  # the path `-R URL` takes
    return create(spec_from_flag("remoteauth", url))


@pytest.mark.parametrize(
    ("url", "name", "target"),
    [
        ("imap://mail.example.org", "imap", "imap://mail.example.org:143"),
        ("imaps://mail.example.org", "imap", "imaps://mail.example.org:993"),
        ("pop3://mail.example.org", "pop3", "pop3://mail.example.org:110"),
        ("pop3s://mail.example.org", "pop3", "pop3s://mail.example.org:995"),
        ("apop://mail.example.org", "pop3", "apop://mail.example.org:110"),
        ("pop3://mail.example.org:2110", "pop3", "pop3://mail.example.org:2110"),
        ("imap://[::1]:1143", "imap", "imap://[::1]:1143"),
        ("IMAP://Mail.Example.org/", "imap", "imap://mail.example.org:143"),  # tmda's tests: "/"
    ],
)
def test_remote_urls_give_default_ports_and_kinds(url: str, name: str, target: str) -> None:
    backend = from_flag(url)
    assert (backend.name, backend.target) == (name, target)


def test_toml_table_takes_url_and_options(tmp_path: Path) -> None:
    ipmap = tmp_path / "ipauthmap"
    ipmap.write_text("127.0.0.2 127.0.0.1 1143\n")
    backend = create(
        BackendSpec(
            kind="imap",
            options={"url": "imap://0.0.0.0", "ipauthmap": str(ipmap), "timeout": 10},
        )
    )
    assert isinstance(backend, ImapLogin)
    assert backend.target == f"imap://0.0.0.0:143 ipauthmap={ipmap}"
    assert backend.server.timeout == 10


@pytest.mark.parametrize(
    ("kind", "options", "complaint"),
    [
        ("imap", {}, "needs url"),
        ("imap", {"url": "pop3://h"}, "expected imap:// or imaps://"),
        ("pop3", {"url": "imap://h"}, "expected pop3://"),
        ("imap", {"url": "imap://h", "colour": "red"}, "unknown setting 'colour'"),
        ("imap", {"url": "imap://h/INBOX"}, "expected imap://HOST[:PORT]"),
        ("imap", {"url": "imap://user:pw@h"}, "imap://user:***@h: no user or password"),
        ("imap", {"url": "imap://h:99999"}, "bad port"),
        ("imap", {"url": "imap://"}, "no host"),
        ("imap", {"url": "imap://h", "timeout": "soon"}, "timeout must be"),
        ("imap", {"url": "imap://h", "timeout": 0}, "timeout must be"),
        ("imap", {"url": "imap://h?tls=none", "verify": False}, "apply to TLS, not tls=none"),
        ("pop3", {"url": "pop3://h", "tls": "none", "ca_file": "/x"}, "not tls=none"),
        ("imap", {"url": "imap://h?tls=maybe"}, "tls must be auto, starttls or none"),
        ("imap", {"url": "imaps://h?tls=starttls"}, "imaps:// is TLS from the start"),
        ("pop3", {"url": "pop3s://h", "tls": "auto"}, "pop3s:// is TLS from the start"),
        ("imaps", {"url": "imaps://h", "verify": "maybe"}, "true or false"),
        ("imap", {"url": "imaps://h", "ca_file": "/nonexistent/ca.pem"}, "ca_file"),
        ("imap", {"url": "imap://h", "ipauthmap": "/etc/x"}, "need host 0.0.0.0"),
        ("imap", {"url": "imap://0.0.0.0", "ipauthmap": "/nonexistent/map"}, "/nonexistent/map"),
    ],
)
def test_bad_remote_configuration_is_one_config_error(
    kind: str, options: dict, complaint: str
) -> None:
    spec_kind = "imap" if kind.startswith("imap") else "pop3"
    with pytest.raises(ConfigError) as caught:
        create(BackendSpec(kind=spec_kind, options=options))
    assert complaint in str(caught.value)
    assert "\n" not in str(caught.value)


def test_url_query_names_ipauthmap_and_timeout(tmp_path: Path) -> None:
    ipmap = tmp_path / "map"
    ipmap.write_text("127.0.0.2:127.0.0.1\n")
    backend = from_flag(f"pop3://0.0.0.0:2110?ipauthmap={ipmap}&timeout=2.5")
    assert isinstance(backend, Pop3Login)
    assert backend.target == f"pop3://0.0.0.0:2110 ipauthmap={ipmap}"
    assert backend.server.timeout == 2.5
    with pytest.raises(ConfigError, match="unknown option 'colour'"):
        from_flag("imap://h?colour=red")


def test_registry_maps_all_five_schemes() -> None:
    assert [kind_for_url(f"{s}://h") for s in ("imap", "imaps", "pop3", "pop3s", "apop")] == [
        "imap",
        "imap",
        "pop3",
        "pop3",
        "pop3",
    ]


def test_default_map_path_follows_tmda_ofmipd(monkeypatch: pytest.MonkeyPatch) -> None:
    assert os.geteuid() == 0  # the tests run as root, as tmda-ofmipd's daemon did
    assert default_map_path() == "/etc/ipauthmap"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", "/home/someone")
    assert default_map_path() == "/home/someone/.tmda/ipauthmap"


# -- the map file ------------------------------------------------------------------------

TMDA_STYLE_MAP = """\
   # Indented comment
# old-style mappings (tmda before 2011)
127.0.0.1:192.168.0.1:1001
127.0.0.2:192.168.0.2# End of line comment
# new-style mappings
127.0.1.1 192.168.1.1 1001
127.0.1.2\t::ffff:192.168.1.2\t1002\t
127.0.1.3 0:0:0:0:0:0:0:3
0000:0000:0000:0000:0000:FFFF:7F00:0401 192.168.4.1 1004
::1 mail.example.org 143
"""


def test_both_map_syntaxes_parse_with_ipv6_and_comments() -> None:
    entries = parse_map(TMDA_STYLE_MAP, "test-map")
    assert entries == {
        "127.0.0.1": ("192.168.0.1", 1001),
        "127.0.0.2": ("192.168.0.2", None),
        "127.0.1.1": ("192.168.1.1", 1001),
        "127.0.1.2": ("192.168.1.2", 1002),  # IPv4-mapped IPv6 is IPv4
        "127.0.1.3": ("::3", None),
        "127.0.4.1": ("192.168.4.1", 1004),  # an IPv4-mapped key matches the IPv4 client
        "::1": ("mail.example.org", 143),
    }


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("127.0.0.2", "expected LOCALIP REMOTEHOST [PORT]"),
        ("127.0.0.2 127.0.0.1 143 extra", "expected LOCALIP REMOTEHOST [PORT]"),
        ("::1:127.0.0.1", "expected"),  # the old colon form cannot carry IPv6
        ("mail.example.org 127.0.0.1", "'mail.example.org' is not an IP address"),
        ("127.0.0.2 bad_host!", "'bad_host!' is not an IP address or host name"),
        ("127.0.0.2 127.0.0.1 http", "'http' is not a port number"),
        ("127.0.0.2 127.0.0.1 0", "'0' is not a port number"),
        ("127.0.0.2:127.0.0.1:70000", "'70000' is not a port number"),
        ("127.0.0.9 127.0.0.1", "127.0.0.9 is already mapped on line 2"),
    ],
)
def test_malformed_map_line_names_file_and_line(line: str, complaint: str) -> None:
    text = "# routes\n127.0.0.9 127.0.0.8\n\n" + line + "\n"
    with pytest.raises(ConfigError) as caught:
        parse_map(text, "/etc/ipauthmap")
    assert str(caught.value).startswith("ipauthmap /etc/ipauthmap line 4: ")
    assert complaint in str(caught.value)


def test_malformed_map_stops_start_up(tmp_path: Path) -> None:
    ipmap = tmp_path / "ipauthmap"
    ipmap.write_text("127.0.0.2 127.0.0.1\n127.0.0.3 127.0.0.1 port\n")
    with pytest.raises(ConfigError, match=f"ipauthmap {ipmap} line 2: 'port'"):
        from_flag(f"imap://0.0.0.0?ipauthmap={ipmap}")


# -- verdict tables ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "verdict"),
    [
        (b"a1 OK [CAPABILITY IMAP4rev1] Logged in", Verdict.ACCEPT),
        (b"a1 ok Logged in", Verdict.ACCEPT),
        (b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.", Verdict.REJECT),
        (b"a1 NO Login failed", Verdict.REJECT),
        (b"a1 NO [EXPIRED] password expired", Verdict.REJECT),
        (b"a1 NO [UNAVAILABLE] Temporary authentication failure.", Verdict.TEMPFAIL),
        (b"a1 NO [SERVERBUG] oops", Verdict.TEMPFAIL),
        (b"a1 NO [PRIVACYREQUIRED] use TLS", Verdict.TEMPFAIL),
        (b"a1 BAD Error in IMAP command", Verdict.TEMPFAIL),
    ],
)
def test_imap_login_answers_map_to_verdicts(line: bytes, verdict: Verdict) -> None:
    assert imap_verdict(line).verdict is verdict


@pytest.mark.parametrize(
    ("line", "command", "verdict"),
    [
        (b"+OK Logged in.", "PASS", Verdict.ACCEPT),
        (b"-ERR [AUTH] Authentication failed.", "PASS", Verdict.REJECT),
        (b"-ERR invalid password", "APOP", Verdict.REJECT),
        (b"-ERR [SYS/TEMP] Temporary authentication failure.", "PASS", Verdict.TEMPFAIL),
        (b"-ERR [SYS/PERM] disk gone", "PASS", Verdict.TEMPFAIL),
        (b"-ERR [LOGIN-DELAY] wait", "PASS", Verdict.TEMPFAIL),
        (b"-ERR [IN-USE] maildrop locked", "PASS", Verdict.TEMPFAIL),  # no proof either
        (b"-ERR [IN-USE] maildrop locked", "APOP", Verdict.TEMPFAIL),
        (b"-ERR [SYS/TEMP/DISK] full", "PASS", Verdict.TEMPFAIL),
        (b"-ERR [IN-USE] maildrop locked", "USER", Verdict.TEMPFAIL),  # no password checked
        (b"-ERR no such user", "USER", Verdict.REJECT),
    ],
)
def test_pop3_answers_map_to_verdicts(line: bytes, command: str, verdict: Verdict) -> None:
    assert pop3_verdict(line, command).verdict is verdict


def test_imap_reasons_never_repeat_server_text() -> None:
    # A server echoing our command would otherwise put the password in the log.
    outcome = imap_verdict(b"a1 NO [AUTHENTICATIONFAILED] you said hunter2")
    assert "hunter2" not in outcome.reason
    assert "hunter2" not in pop3_verdict(b"-ERR [AUTH] you said hunter2", "PASS").reason


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (b"alice", (b'"alice"', None)),
        (b"two words", (b'"two words"', None)),
        (b'say "hi"', (b"{8}", b'say "hi"')),
        (b"back\\slash", (b"{10}", b"back\\slash")),
        ("jürgen".encode(), (b"{7}", "jürgen".encode())),
        (b"tab\there", (b"{8}", b"tab\there")),
    ],
)
def test_imap_strings_are_quoted_or_literal(value: bytes, wire: tuple) -> None:
    assert astring(value) == wire
