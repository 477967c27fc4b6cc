"""ofmipd.proc.run_program against real programs: exits, signals, timeouts, pipes, fd 3."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from ofmipd import proc
from ofmipd.proc import ProgramResult, command_argv, environment, run_program
from tests.loop_ticker import with_ticker


@pytest.fixture(autouse=True, params=["pidfd", "asyncio"])
def spawn_path(request, monkeypatch):
    """Every test runs on both start paths: posix_spawn + pidfd, and asyncio's subprocess."""
    if request.param == "pidfd":
        assert proc.pidfd_spawn_works()  # this machine (Linux 5.3+) must take the fast path
    monkeypatch.setattr(proc, "_PIDFD_SPAWN", request.param == "pidfd")
    return request.param


def test_fd3_data_arrives_and_the_fast_path_starts_no_thread(spawn_path, tmp_path):
    import threading

    script = tmp_path / "show"
    script.write_text("#!/bin/sh\ntr '\\0' , <&3; echo; cat; sleep 0.3\n")
    script.chmod(0o755)

    async def go() -> tuple[ProgramResult, int]:
        task = asyncio.ensure_future(
            run_program([str(script)], timeout=10, pass_fds_data={3: b"u\0p\0\0"})
        )
        await asyncio.sleep(0.15)
        threads = threading.active_count()
        return await task, threads

    before = threading.active_count()
    result, during = asyncio.run(go())
    assert result.exit_code == 0
    assert result.stdout == b"u,p,,\n"  # fd 3 has the data; stdin is empty (/dev/null)
    if spawn_path == "pidfd":
        assert during == before  # asyncio's watcher would add a thread per child


def run(**kwargs: object) -> ProgramResult:
    return asyncio.run(run_program(**kwargs))  # type: ignore[arg-type]


def is_gone(pid: int) -> bool:
    """True once pid is dead: no such process, or a zombie nobody has reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_gone(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if is_gone(pid):
            return True
        time.sleep(0.02)
    return is_gone(pid)


def test_exit_code_and_both_outputs_are_captured() -> None:
    result = run(argv=["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10)
    assert (result.exit_code, result.signal, result.timed_out) == (3, None, False)
    assert (result.stdout, result.stderr) == (b"out\n", b"err\n")
    assert result.describe() == "exit 3"


def test_death_by_signal_is_reported_by_name() -> None:
    result = run(argv=["sh", "-c", "kill -SEGV $$"], timeout=10)
    assert result.exit_code is None and result.signal == signal.SIGSEGV
    assert result.describe() == "killed by SIGSEGV"


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child"
    started = time.monotonic()
    result = run(argv=["sh", "-c", f"sleep 1000 & echo $! >{pidfile}; wait"], timeout=0.5)
    assert time.monotonic() - started < 4
    assert result.timed_out and result.signal == signal.SIGKILL
    assert result.describe() == "timed out after 0.5s"
    assert wait_gone(int(pidfile.read_text())), "the program's child survived the timeout"


def test_cancelling_the_caller_kills_the_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child"
    argv = ["sh", "-c", f"echo $$ >{pidfile}.sh; sleep 1000 & echo $! >{pidfile}; wait"]

    async def cancelled() -> None:
        task = asyncio.create_task(run_program(argv, timeout=100))
        # ASYNC110: the shell writes the file; there is no event to wait on.
        while not pidfile.exists() or not pidfile.read_text().strip():  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(cancelled(), 20))
    assert wait_gone(int(pidfile.read_text()))
    assert wait_gone(int(Path(f"{pidfile}.sh").read_text()))


def test_one_megabyte_through_cat() -> None:
    data = os.urandom(1 << 20)
    result = run(argv=["cat"], stdin=data, timeout=20, output_limit=2 << 20)
    assert result.exit_code == 0
    assert result.stdout == data


def test_program_that_never_reads_stdin_and_exits() -> None:
    started = time.monotonic()
    result = run(argv=["true"], stdin=os.urandom(1 << 20), timeout=20)
    assert result.exit_code == 0
    assert time.monotonic() - started < 5


def test_program_that_never_reads_stdin_and_never_exits_is_timed_out() -> None:
    started = time.monotonic()
    result = run(argv=["sleep", "1000"], stdin=os.urandom(1 << 20), timeout=0.5)
    assert result.timed_out
    assert time.monotonic() - started < 4


def test_output_beyond_the_limit_is_read_and_dropped() -> None:
    # 10 MB through a 64 KB pipe: the program would block forever if we stopped reading.
    result = run(argv=["head", "-c", "10000000", "/dev/zero"], timeout=20, output_limit=1000)
    assert result.exit_code == 0
    assert result.stdout == b"\0" * 1000


def test_slow_reader_of_stdin_gets_everything_and_the_loop_stays_responsive() -> None:
    reader = (
        "import sys, time, hashlib\n"
        "h = hashlib.sha256()\n"
        "while chunk := sys.stdin.buffer.read1(16384):\n"
        "    h.update(chunk); time.sleep(0.02)\n"
        "print(h.hexdigest())\n"
    )
    data = os.urandom(256 * 1024)
    result, worst = asyncio.run(
        with_ticker(run_program([sys.executable, "-c", reader], stdin=data, timeout=30))
    )
    assert result.exit_code == 0
    assert result.stdout.decode().strip() == hashlib.sha256(data).hexdigest()
    assert worst < 0.1, f"event loop stalled {worst * 1000:.0f} ms"


FD3_PROBE = (
    "import os\n"
    "data = b''\n"
    "while chunk := os.read(3, 100):\n"
    "    data += chunk\n"
    "print(repr(data), os.readlink('/proc/self/fd/0'))\n"
)


@pytest.mark.parametrize(
    "argv",
    [
        [sys.executable, "-c", FD3_PROBE],  # wrapped: sh moves the data, then execs
        ["/bin/sh", "-c", f'exec {sys.executable} -c "$1"', "sh", FD3_PROBE],  # folded
    ],
)
def test_fd_data_arrives_on_fd_3_with_stdin_from_dev_null(argv: list[str]) -> None:
    result = run(argv=argv, timeout=20, pass_fds_data={3: b"alice\0pw\0\0"})
    assert result.exit_code == 0, result.stderr
    assert result.stdout.decode().strip() == "b'alice\\x00pw\\x00\\x00' /dev/null"


def test_fd_data_of_a_program_that_never_reads_fd_3() -> None:
    result = run(argv=["true"], timeout=20, pass_fds_data={3: os.urandom(200_000)})
    assert result.exit_code == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"stdin": b"x", "pass_fds_data": {3: b"y"}},
        {"pass_fds_data": {3: b"y", 4: b"z"}},
        {"pass_fds_data": {12: b"y"}},
        {"pass_fds_data": {1: b"y"}},
    ],
)
def test_unsupported_fd_data_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        run(argv=["true"], timeout=5, **kwargs)


def test_a_program_that_cannot_start_gives_a_result_not_an_exception() -> None:
    result = run(argv=["/nonexistent/program"], timeout=5)
    assert result.exit_code is None and result.signal is None and not result.timed_out
    assert result.error is not None and "No such file" in result.error
    assert result.describe().startswith("could not start: ")


def test_descendants_holding_stdout_delay_us_only_for_the_grace(tmp_path: Path) -> None:
    # The program exits at once; a background child keeps stdout open for 1000 s.
    result = run(argv=["sh", "-c", "sleep 1000 & echo $$"], timeout=30)
    try:
        assert result.exit_code == 0
        assert result.seconds < proc.EOF_GRACE + 2
    finally:
        os.killpg(int(result.stdout), signal.SIGKILL)


def test_environment_and_cwd_reach_the_program(tmp_path: Path) -> None:
    env = environment({"OFM_SET": "yes"}, drop=["HOME"])
    result = run(argv=["sh", "-c", 'echo "$OFM_SET ${HOME-unset}"; pwd'], timeout=10, env=env,
                 cwd=str(tmp_path))  # fmt: skip
    assert result.stdout.decode().split("\n")[:2] == ["yes unset", str(tmp_path)]


def test_environment_keeps_our_variables_and_overrides_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFM_KEEP", "1")
    monkeypatch.setenv("OFM_OVER", "old")
    env = environment({"OFM_OVER": "new"}, drop=["OFM_GONE"])
    assert env["OFM_KEEP"] == "1" and env["OFM_OVER"] == "new" and "OFM_GONE" not in env


@pytest.mark.parametrize(
    ("command", "argv"),
    [
        ("/usr/bin/checkpw /bin/true", ["/usr/bin/checkpw", "/bin/true"]),
        ("prog -s id -- /bin/true", ["prog", "-s", "id", "--", "/bin/true"]),
        ("  prog   --x=1  ", ["prog", "--x=1"]),
        ("FOO=1 prog", ["/bin/sh", "-c", "FOO=1 prog"]),
        ("prog 2>/dev/null", ["/bin/sh", "-c", "prog 2>/dev/null"]),
        ("prog $HOME", ["/bin/sh", "-c", "prog $HOME"]),
        ("prog 'a b'", ["/bin/sh", "-c", "prog 'a b'"]),
        ("prog ~/x", ["/bin/sh", "-c", "prog ~/x"]),
        ("prog *", ["/bin/sh", "-c", "prog *"]),
    ],
)
def test_command_argv_uses_the_shell_only_when_needed(command: str, argv: list[str]) -> None:
    assert command_argv(command) == argv


def test_concurrent_programs_do_not_serialize() -> None:
    async def five() -> list[ProgramResult]:
        return await asyncio.gather(*(run_program(["sleep", "1"], timeout=20) for _ in range(5)))

    started = time.monotonic()
    results, worst = asyncio.run(with_ticker(five()))
    elapsed = time.monotonic() - started
    assert all(r.exit_code == 0 for r in results)
    assert elapsed < 2.5, f"5 x 1 s took {elapsed:.2f} s"
    assert worst < 0.1, f"event loop stalled {worst * 1000:.0f} ms"
