"""conf/systemd socket units, run by systemd-socket-activate (no systemd PID 1 here).

The ListenStream=, Accept= and ExecStart= lines are read from the unit files, so what
runs is what the units say, with paths and ports replaced.
"""

from __future__ import annotations

import shutil
import socket
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.deploy_support import (
    CONF,
    USERS_PATH,
    Workspace,
    exec_start,
    msmtp,
    received,
    unit_values,
    wait_for_banner,
)

ACTIVATE = shutil.which("systemd-socket-activate") or "/usr/bin/systemd-socket-activate"


def activate_args(socket_unit: str, service_unit: str, listen: dict[str, str]) -> list[str]:
    """systemd-socket-activate flags for what the two units say."""
    socket_text = (CONF / "systemd" / socket_unit).read_text()
    service_text = (CONF / "systemd" / service_unit).read_text()
    streams = unit_values(socket_text, "ListenStream")
    assert sorted(streams) == sorted(listen), streams
    args = [ACTIVATE]
    for stream in streams:
        args += ["-l", listen[stream]]
    if unit_values(socket_text, "Accept") == ["yes"]:
        args.append("--accept")
        # StandardInput=socket: the connection on stdin/stdout, as inetd does it.
        assert unit_values(service_text, "StandardInput") == ["socket"]
        assert unit_values(service_text, "StandardOutput") == ["socket"]
        args.append("--inetd")
    return args


def state_directory(service_unit: str, root: Path) -> list[str]:
    """systemd-socket-activate flags for what StateDirectory= makes systemd do: create
    /var/lib/NAME (here under `root`) and name it in $STATE_DIRECTORY."""
    (name,) = unit_values((CONF / "systemd" / service_unit).read_text(), "StateDirectory")
    path = root / "var-lib" / name
    path.mkdir(parents=True, mode=0o700)
    return ["-E", f"STATE_DIRECTORY={path}"]


def test_every_service_keeps_its_state_in_systemds_state_directory() -> None:
    services = sorted((CONF / "systemd").glob("*.service"))
    assert len(services) == 5
    for unit in services:
        text = unit.read_text()
        assert unit_values(text, "StateDirectory") == ["ofmipd"], unit.name
        assert unit_values(text, "StateDirectoryMode") == ["0700"], unit.name


def test_accept_yes_one_ofmipd_per_connection(work: Workspace) -> None:
    port = free_port()
    argv = activate_args("ofmipd.socket", "ofmipd@.service", {"587": f"127.0.0.1:{port}"})
    assert "--accept" in argv
    command = exec_start(
        "systemd/ofmipd@.service", work.replacements(**{USERS_PATH: str(work.users)})
    )
    assert command[:2] == [str(work.ofmipd), "-1"]
    state = state_directory("ofmipd@.service", work.root)
    launched = work.start([*argv, *state, *command], "activate")
    wait_for_banner("127.0.0.1", port, launched)
    for source in ("127.0.0.5", "127.0.0.6"):
        sent = msmtp(work.root, port, source_ip=source, tls="off", subject=source)
        assert sent.returncode == 0, sent.stdout + sent.stderr + launched.log()
    headers = sorted(received(m) for m in work.messages())
    assert len(headers) == 2
    assert "[127.0.0.5]" in headers[0] and "[127.0.0.6]" in headers[1], headers
    assert all("with ESMTPA" in h for h in headers), headers
    # one process per connection: the launcher reports each child it spawned
    assert launched.log().count("Spawned ") >= 3  # the readiness probe and the two clients
    # and every one of them counted logins in the one database systemd's directory holds
    with sqlite3.connect(work.root / "var-lib" / "ofmipd" / "ofmipd.db") as db:
        (known,) = db.execute("SELECT count(*) FROM records").fetchone()
    assert known >= 2  # each login recorded its address as known-good for alice
    assert not work.state.exists()


def test_accept_yes_uses_remote_addr_from_systemd(work: Workspace) -> None:
    """systemd sets REMOTE_ADDR/REMOTE_PORT for Accept=yes; the tool does not, so set it."""
    port = free_port()
    argv = activate_args("ofmipd.socket", "ofmipd@.service", {"587": f"127.0.0.1:{port}"})
    command = exec_start(
        "systemd/ofmipd@.service", work.replacements(**{USERS_PATH: str(work.users)})
    )
    env = ["-E", "REMOTE_ADDR=192.0.2.17", "-E", "REMOTE_PORT=4242"]
    launched = work.start([*argv, *env, *command], "activate")
    wait_for_banner("127.0.0.1", port, launched)
    sent = msmtp(work.root, port, source_ip="127.0.0.5", tls="off")
    assert sent.returncode == 0, sent.stdout + sent.stderr + launched.log()
    (message,) = work.messages()
    assert "[192.0.2.17]" in received(message)


def test_daemon_gets_listening_sockets_from_systemd(work: Workspace) -> None:
    port4, port6 = free_port(), free_port("::1")
    argv = activate_args(
        "ofmipd-daemon.socket",
        "ofmipd.service",
        {"0.0.0.0:587": f"127.0.0.1:{port4}", "[::]:587": f"[::1]:{port6}"},
    )
    assert "--accept" not in argv
    assert unit_values((CONF / "systemd" / "ofmipd-daemon.socket").read_text(), "Service") == [
        "ofmipd.service"
    ]
    command = exec_start(
        "systemd/ofmipd.service", work.replacements(**{USERS_PATH: str(work.users)})
    )
    # -p names where to listen without systemd; a port of its own proves it is not used.
    unused = free_port()
    command[command.index("-p") + 1] = f"127.0.0.1:{unused}"
    launched = work.start([*argv, *command], "daemon")
    wait_for_banner("127.0.0.1", port4, launched)
    wait_for_banner("::1", port6, launched)
    sent = msmtp(work.root, port4, source_ip="127.0.0.5", tls="off", subject="v4")
    assert sent.returncode == 0, sent.stdout + sent.stderr + launched.log()
    sent = msmtp(work.root, port6, host="::1", tls="off", subject="v6")
    assert sent.returncode == 0, sent.stdout + sent.stderr + launched.log()
    headers = [received(m) for m in work.messages()]
    assert any("[127.0.0.5]" in h for h in headers) and any("[::1]" in h for h in headers)
    # one long-running process served both: the launcher exec'd it, no children spawned
    assert launched.proc.poll() is None
    assert "Spawned" not in launched.log()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", unused), timeout=10).close()
