"""conf/xinetd.d/ofmipd + conf/stunnel/ofmipd-inetd.conf: a private xinetd starts stunnel
in inetd mode, which does STARTTLS itself and runs `ofmipd -1 --tls-in-front`."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.deploy_support import (
    CHECKPW_PATH,
    Workspace,
    instantiate,
    make_certificate,
    msmtp,
    received,
    wait_for_banner,
)

XINETD = shutil.which("xinetd") or "/usr/sbin/xinetd"


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[tuple[Workspace, int, Path]]:
    work = Workspace(tmp_path)
    cert, _, both = make_certificate(tmp_path)
    stunnel_conf = tmp_path / "ofmipd-inetd.conf"
    stunnel_log = tmp_path / "stunnel.log"
    stunnel_conf.write_text(
        instantiate(
            "stunnel/ofmipd-inetd.conf",
            work.replacements(
                **{"/etc/ssl/private/mail.pem": str(both), CHECKPW_PATH: str(work.checkpw)}
            ),
        )
        + f"output = {stunnel_log}\ndebug = 6\n"
    )
    port = free_port()
    service = instantiate(
        "xinetd.d/ofmipd",
        {
            "port            = 587": f"port            = {port}",
            "bind            = 0.0.0.0": "bind            = 127.0.0.1",
            "/etc/stunnel/ofmipd-inetd.conf": str(stunnel_conf),
        },
    )
    xinetd_conf = tmp_path / "xinetd.conf"
    xinetd_conf.write_text("defaults\n{\n}\n\n" + service)
    try:
        xinetd = work.start(
            [XINETD, "-dontfork", "-f", str(xinetd_conf), "-pidfile", str(tmp_path / "x.pid")],
            "xinetd",
        )
        wait_for_banner("127.0.0.1", port, xinetd)
        yield work, port, cert
    finally:
        work.close()
        if stunnel_log.exists():
            print(stunnel_log.read_text(errors="replace"))


def test_starttls_by_stunnel_auth_by_checkpassword_client_from_environment(
    chain: tuple[Workspace, int, Path],
) -> None:
    work, port, cert = chain
    sent = msmtp(work.root, port, source_ip="127.0.0.5", trust=cert)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    (message,) = work.messages()
    header = received(message)
    # REMOTE_HOST from xinetd/stunnel, not stunnel's socketpair, names the client.
    assert "[127.0.0.5]" in header, header
    assert "with ESMTPSA" in header and "authenticated user alice" in header, header
    assert "by mx.test (ofmipd)" in header, header


def test_wrong_password_is_refused_through_the_chain(chain: tuple[Workspace, int, Path]) -> None:
    work, port, cert = chain
    (work.root / "bad").mkdir()
    sent = msmtp(work.root / "bad", port, source_ip="127.0.0.5", trust=cert, password="nope")
    assert sent.returncode != 0
    assert "535" in sent.stdout + sent.stderr
    assert work.messages() == []
    # counted where every ofmipd -1 of this chain looks (ofmipd runs as root here and
    # makes its state directory itself; the workspace puts it in place of /var/lib/ofmipd)
    with sqlite3.connect(work.state / "ofmipd.db") as db:
        (counted,) = db.execute("SELECT count(*) FROM counters WHERE used > 0").fetchone()
    assert counted == 2  # the client address and the user name
