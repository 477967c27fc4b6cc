"""scripts/demo: a private directory of its own, and the instructions it prints work.

The script runs from a copy of the repository layout whose set-up steps (system packages,
the venv) are no-ops and whose .venv/bin/ofmipd is this checkout's ofmipd: what is tested
is the script's own logic and the real server it starts.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.ofmipd_server import ROOT, server_env, wait_for_port


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    (root / ".venv" / "bin").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "demo", root / "scripts" / "demo")
    for name in ("venv", "install-system-deps"):
        (root / "scripts" / name).write_text("#!/bin/sh\nexit 0\n")
    (root / ".venv" / "bin" / "ofmipd").write_text(
        f'#!/bin/sh\nexec {sys.executable} -m ofmipd "$@"\n'
    )
    for path in [*(root / "scripts").iterdir(), root / ".venv" / "bin" / "ofmipd"]:
        path.chmod(0o755)
    return root


def demo_env(tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    temp = tmp_path / "temp"
    temp.mkdir(exist_ok=True)
    return server_env(TMPDIR=str(temp), OFMIPD_DEMO_PORT=str(port), **extra)


@pytest.mark.parametrize("where", ["fresh", "named"])
def test_demo_runs_in_a_private_directory_and_its_instructions_deliver(
    repo: Path, tmp_path: Path, where: str
) -> None:
    port = free_port()
    named = tmp_path / "named" / "demo"
    extra = {"OFMIPD_DEMO_DIR": str(named)} if where == "named" else {}
    proc = subprocess.Popen(
        [str(repo / "scripts" / "demo")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=demo_env(tmp_path, port, **extra),
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        printed = []
        for line in proc.stdout:
            printed.append(line.rstrip("\n"))
            if line.startswith("Press Ctrl-C"):
                break
        wait_for_port("127.0.0.1", port, proc)
        (python_line,) = [line.strip() for line in printed if line.strip().startswith("python3 -c")]
        subprocess.run(["/bin/sh", "-c", python_line], check=True, timeout=60)
        (where_line,) = [line for line in printed if "delivered into the Maildir" in line]
        maildir = Path(where_line.split("Maildir ", 1)[1].split(" (look")[0])
        assert len(list((maildir / "new").iterdir())) == 1
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(30)
    demo = maildir.parent
    if where == "fresh":
        assert demo.parent == tmp_path / "temp" and demo.name.startswith("ofmipd-demo.")
    else:
        assert demo == named
    st = demo.stat()
    assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700
    assert stat.S_IMODE((demo / "users").stat().st_mode) == 0o600


def untrusted(tmp_path: Path, kind: str) -> Path:
    place = tmp_path / "demo"
    if kind == "another user's":
        place.mkdir(mode=0o700)
        os.chown(place, 65534, 65534)  # nobody
    elif kind == "writable by others":
        place.mkdir()
        place.chmod(0o1777)
    elif kind == "a symbolic link":
        real = tmp_path / "real"
        real.mkdir(mode=0o700)
        place.symlink_to(real)
    return place


@pytest.mark.parametrize("kind", ["another user's", "writable by others", "a symbolic link"])
def test_demo_refuses_a_directory_it_cannot_trust(repo: Path, tmp_path: Path, kind: str) -> None:
    place = untrusted(tmp_path, kind)
    result = subprocess.run(
        [str(repo / "scripts" / "demo")],
        capture_output=True,
        text=True,
        env=demo_env(tmp_path, free_port(), OFMIPD_DEMO_DIR=str(place)),
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"scripts/demo: OFMIPD_DEMO_DIR={place} ")
    assert result.stderr.count("\n") == 1
    assert not (place / "users").exists()
