"""conf/postfix: ofmipd on 587 (STARTTLS) and 465 (implicit TLS) in front of Postfix,
relaying to the master.cf service the recipe gives, with the TOML files as written
(paths and ports replaced). msmtp is the mail client; Postfix's log must show the
client's address and login (XCLIENT) and the delivery."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.deploy_support import PASSWORD, RECIPIENT, USER, instantiate, make_certificate, msmtp
from tests.ofmipd_server import Daemon, authfile, server_env
from tests.postfix_server import Postfix

pytestmark = pytest.mark.slow  # a Postfix of its own and two ofmipd daemons


@pytest.mark.parametrize(
    "recipe,tls", [("ofmipd-587.toml", "starttls"), ("ofmipd-465.toml", "implicit")]
)
def test_ofmipd_in_front_of_postfix(tmp_path: Path, recipe: str, tls: str) -> None:
    root = Path(tempfile.mkdtemp(prefix="ofmipd-postfix-"))
    downstream = free_port()
    service = instantiate(
        "postfix/master.cf",
        {"127.0.0.1:10587": f"127.0.0.1:{downstream}", "inet  n       -       y": "inet n - n"},
    )  # no chroot for a private instance
    postfix = Postfix(root, free_port(), extra_master=service)
    postfix.start()
    try:
        cert, key, _ = make_certificate(tmp_path)
        users = authfile(tmp_path, f"{USER}:{PASSWORD}\n")
        port = free_port()
        listen = "0.0.0.0:587" if "587" in recipe else "0.0.0.0:465"
        config = tmp_path / recipe
        config.write_text(
            instantiate(
                f"postfix/{recipe}",
                {
                    listen: f"127.0.0.1:{port}",
                    'username = "ofmipd"\n': "",  # the tests run as root, and stay so
                    "/etc/ssl/certs/mail.pem": str(cert),
                    "/etc/ssl/private/mail.key": str(key),
                    "/etc/ofmipd/users": str(users),
                    "smtp://127.0.0.1:10587": f"smtp://127.0.0.1:{downstream}",
                },
            )
        )
        with Daemon(["--config", str(config), "-L"], port, tmp_path, env=server_env()):
            sent = msmtp(tmp_path, port, tls=tls)
            assert sent.returncode == 0, sent.stdout + sent.stderr
        [delivered] = postfix.wait_for_log(rf"to=<{RECIPIENT}>.*status=sent")
        qid = delivered.split(": ")[1]
        [smtpd] = postfix.wait_for_log(rf"postfix/ofmipd/smtpd\[\d+\]: {qid}: client=")
        # NAME: ofmipd's reverse lookup of 127.0.0.1, as its Received header has it.
        assert re.search(
            rf"client=\S+\[127\.0\.0\.1\], sasl_method=XCLIENT, sasl_username={USER}$", smtpd
        )
        assert "client=unknown[" not in smtpd
    finally:
        postfix.stop()
        shutil.rmtree(root, ignore_errors=True)
