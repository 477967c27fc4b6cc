"""The sender map (--sender-map): how a line is split, which lines are refused at
start-up, and what a logged-in user hears on a real daemon."""

from __future__ import annotations

import smtplib
import subprocess
from pathlib import Path

import pytest

from ofmipd.errors import ConfigError
from ofmipd.senders import SenderMap
from tests.conftest import free_port
from tests.ofmipd_server import CAPTURE, Daemon, authfile, ofmipd_command, server_env

PASSWORD = "Sender-Map-7"
# A tab after the user name and spaces in the address list: the line that used to be
# dropped, leaving gina with the "*" permissions.
TAB_MAP = "# user\tmay send as\ngina\tgina@example.org, g@gina.example\n*\t@example.org\n"


def test_tab_after_user_with_spaces_between_addresses_keeps_the_users_line() -> None:
    senders = SenderMap.from_text(TAB_MAP, "senders")
    assert senders.entries["gina"] == ("gina@example.org", "g@gina.example")
    assert not senders.allows("gina", "boss@example.org")  # not from the "*" line
    assert senders.allows("Gina", "G@Gina.Example")
    assert senders.allows("hank", "boss@example.org")


def test_user_name_ends_at_the_first_run_of_blanks() -> None:
    text = "alice \t  a@x.org,b@x.org  ,\t@y.org # comment\r\nalice c@x.org\nbob\t b@x.org\n"
    senders = SenderMap.from_text(text, "senders")
    assert senders.entries == {
        "alice": ("a@x.org", "b@x.org", "@y.org", "c@x.org"),
        "bob": ("b@x.org",),
    }


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("alice,bob a@x.org", "contains a comma"),
        ("alice, a@x.org", "contains a comma"),
        ("alice: a@x.org", "ends with ':'"),
        ("alice smith a@x.org", "'smith' is not an address or @domain (a user name cannot"),
        ("alice <a@x.org>", "'<a@x.org>' is not an address"),
        ("alice a@x.org b@@x.org", "'b@@x.org' is not an address"),
        ("alice", "'alice' has no addresses"),
        ("alice\x0ba@x.org", "U+000B"),
        ("alice\u00a0a@x.org", "U+00A0"),
        ("alice a@x.org\u2028bob b@x.org", "U+2028"),
        ("alice a@x.org\x85bob b@x.org", "U+0085"),
        ("alice\x00 a@x.org", "U+0000"),
    ],
)
def test_line_that_cannot_mean_what_it_seems_is_refused(line: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as error:
        SenderMap.from_text(f"# senders\n{line}\n* @example.org\n", "/etc/ofmipd/senders")
    message = str(error.value)
    assert message.startswith("/etc/ofmipd/senders line 2: "), message
    assert fragment in message, message
    assert message.isprintable(), message


@pytest.fixture
def users(tmp_path: Path) -> Path:
    return authfile(tmp_path, f"gina:{PASSWORD}\n")


def test_daemon_applies_tab_separated_line(tmp_path: Path, users: Path) -> None:
    senders = tmp_path / "senders"
    senders.write_text(TAB_MAP)
    port = free_port()
    args = ["-p", f"127.0.0.1:{port}", "--hostname", "mx.test", "-a", str(users),
            "--sendmail", CAPTURE, "--sender-map", str(senders)]  # fmt: skip
    with Daemon(args, port, tmp_path, env=server_env(CAPTURE_DIR=str(tmp_path))):
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
            client.ehlo("senders.test")
            client.login("gina", PASSWORD)
            code, text = client.mail("boss@example.org")
            assert (code, text[:5]) == (553, b"5.7.1"), text
            client.rset()
            assert client.mail("g@gina.example")[0] == 250


def test_refused_sender_map_stops_startup_with_one_line(tmp_path: Path, users: Path) -> None:
    senders = tmp_path / "senders"
    senders.write_text("gina gina@example.org\nhank,ivy @example.org\n")
    result = subprocess.run(
        ofmipd_command("-p", f"127.0.0.1:{free_port()}", "-a", str(users), "--sendmail",
                       CAPTURE, "--sender-map", str(senders)),
        capture_output=True, timeout=60, env=server_env(),
    )  # fmt: skip
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert err.strip() == f"ofmipd: {senders} line 2: user name 'hank,ivy' contains a comma " + (
        "(one user per line)"
    )
