"""Run a program from the event loop: input fed, output captured, its process group killed.

checkpassword programs, the sendmail injector and the throttle script all run through
run_program(). The program gets its own session (start_new_session), so a timeout kills
it and everything it started with one killpg. Pipes are read and written with
add_reader/add_writer on non-blocking descriptors: a program that reads slowly or never
cannot stall the loop, and no thread is needed.

On Linux 5.3 and later the program is started with posix_spawn, whose dup2 actions put
checkpassword's fd 3 in place, and reaped when its pidfd turns readable (_SpawnedChild).
Elsewhere asyncio's subprocess starts it, and data for a descriptor other than stdin
rides in on the child's stdin and a /bin/sh prologue moves it into place
(`exec 3<&0 0</dev/null`). Why not
pass_fds: it keeps the parent's fd number, and ours is whatever os.pipe() returned.
Why not a preexec_fn doing dup2: it is unsafe with threads (the offload pools) and
forces fork() instead of vfork(). Why stdin as the carrier: dash, Debian's /bin/sh,
only accepts descriptors 0-9 in redirections, and stdin is the one slot whose number we
control. When the program already is `/bin/sh -c SCRIPT` the prologue joins SCRIPT, so
the move costs no extra exec.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

SHELL = "/bin/sh"
OUTPUT_LIMIT = 64 * 1024  # bytes kept of each of stdout and stderr; the rest is read and dropped
EOF_GRACE = 1.0  # seconds to let descendants that inherited stdout/stderr finish after an exit
KILL_GRACE = 5.0  # seconds to wait for a SIGKILLed program to be reaped
CHUNK = 65536
# Words a shell would take literally: a command made only of these needs no shell.
# (A pattern: re compiles it on first use, not in every process start.)
_PLAIN_WORD = r"[A-Za-z0-9_@%+=:,./-]+\Z"


class ProgramResult(NamedTuple):
    exit_code: int | None  # None when a signal ended the program or it never started
    signal: int | None
    timed_out: bool
    stdout: bytes
    stderr: bytes
    timeout: float
    seconds: float
    error: str | None = None  # why the program could not be started

    def describe(self) -> str:
        """For logs and reasons: "exit 1", "killed by SIGSEGV", "timed out after 10s"."""
        if self.error is not None:
            return f"could not start: {self.error}"
        if self.timed_out:
            return f"timed out after {self.timeout:g}s"
        if self.signal is not None:
            return f"killed by {signal_name(self.signal)}"
        return f"exit {self.exit_code}"


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def command_argv(command: str) -> list[str]:
    """A command line as the admin wrote it: plain words run directly, anything else by sh.

    Running a plain command without a shell means the program itself is the process we
    watch, so a crash reads "killed by SIGSEGV" instead of the shell's "exit 139".
    """
    words = command.split()
    if words and "=" not in words[0] and all(re.match(_PLAIN_WORD, w) for w in words):
        return words
    return [SHELL, "-c", command]


def environment(overrides: Mapping[str, str], drop: Iterable[str] = ()) -> dict[str, str]:
    """Our environment without the names in `drop`, plus `overrides`."""
    env = dict(os.environ)
    for name in drop:
        env.pop(name, None)
    env.update(overrides)
    return env


def _moved_from_stdin(argv: list[str], target: int) -> list[str]:
    prologue = f"exec {target}<&0 0</dev/null"
    if len(argv) >= 3 and argv[0] == SHELL and argv[1] == "-c":
        return [SHELL, "-c", f"{prologue}\n{argv[2]}", *argv[3:]]
    return [SHELL, "-c", f'{prologue}; exec "$@"', "sh", *argv]


def _input_plan(
    args: list[str], stdin: bytes | None, pass_fds_data: Mapping[int, bytes] | None, fast: bool
) -> tuple[list[str], bytes | None, int]:
    """argv, the bytes to feed, and the child's descriptor they arrive on."""
    if not pass_fds_data:
        return args, stdin, 0
    if stdin is not None or len(pass_fds_data) != 1:
        raise ValueError("pass_fds_data carries one descriptor, and only when stdin is None")
    [(target, feed)] = pass_fds_data.items()
    if not 3 <= target <= 9:
        raise ValueError(f"pass_fds_data descriptor {target} is not in 3-9")
    if fast:
        return args, feed, target
    return _moved_from_stdin(args, target), feed, 0


# ASYNC109: the timeout is not the caller's deadline: on expiry the program's process group
# is killed and the result says so (timed_out), which a caller's asyncio.timeout cannot do.
async def run_program(
    argv: Sequence[str],
    *,
    timeout: float,  # noqa: ASYNC109
    stdin: bytes | None = None,
    env: Mapping[str, str] | None = None,
    pass_fds_data: Mapping[int, bytes] | None = None,
    cwd: str | None = None,
    output_limit: int = OUTPUT_LIMIT,
) -> ProgramResult:
    """Run argv with `stdin` (None: /dev/null), kill its process group after `timeout`.

    pass_fds_data gives one descriptor (3-9) its data, as {3: b"..."}; it uses the stdin
    slot (see the module docstring), so stdin must then be None. A program that cannot
    be started gives a result with `error` set, not an exception.
    """
    fast = cwd is None and pidfd_spawn_works()
    args, feed, target = _input_plan(list(argv), stdin, pass_fds_data, fast)
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe() if feed is not None else (subprocess.DEVNULL, -1)
    process: asyncio.subprocess.Process | _SpawnedChild
    try:
        if fast:
            fds = {1: out_w, 2: err_w} | ({target: in_r} if feed is not None else {})
            process = _SpawnedChild(loop, args, env, fds)
        else:
            process = await asyncio.create_subprocess_exec(
                *args,
                stdin=in_r,
                stdout=out_w,
                stderr=err_w,
                env=env,
                cwd=cwd,
                start_new_session=True,  # its own process group, killed as one on timeout
            )
    except BaseException as error:
        for fd in (out_r, err_r, in_w):
            if fd >= 0:
                os.close(fd)
        if not isinstance(error, OSError):
            raise
        return ProgramResult(
            None, None, False, b"", b"", timeout, time.monotonic() - started, str(error)
        )
    finally:
        # The child has its own copies; ours would hide its exit (no EOF, no EPIPE for us).
        for fd in (out_w, err_w, in_r):
            if fd >= 0:
                os.close(fd)

    stdout = _Reader(loop, out_r, output_limit)
    stderr = _Reader(loop, err_r, output_limit)
    writer = _Writer(loop, in_w, feed) if feed is not None else None
    timed_out = False
    try:
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            timed_out = True
            _kill_group(process.pid)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), KILL_GRACE)
        # Output still in the pipes is wanted; a descendant holding them open is not waited for.
        await asyncio.wait([stdout.eof, stderr.eof], timeout=EOF_GRACE)
    finally:
        if process.returncode is None:  # cancelled, or it survived SIGKILL's grace
            _kill_group(process.pid)
        for end in (stdout, stderr, writer):
            if end is not None:
                end.close()

    code = process.returncode
    return ProgramResult(
        exit_code=code if code is not None and code >= 0 else None,
        signal=-code if code is not None and code < 0 else None,
        timed_out=timed_out,
        stdout=bytes(stdout.data),
        stderr=bytes(stderr.data),
        timeout=timeout,
        seconds=time.monotonic() - started,
    )


_PIDFD_SPAWN: bool | None = None  # found out on first use; tests set it to try both paths


def pidfd_spawn_works() -> bool:
    """posix_spawn and pidfd_open (Linux 5.3+) are there: see _SpawnedChild."""
    global _PIDFD_SPAWN
    if _PIDFD_SPAWN is None:
        try:
            os.close(os.pidfd_open(os.getpid()))
            _PIDFD_SPAWN = hasattr(os, "posix_spawnp")
        except (AttributeError, OSError):  # not Linux, or a kernel before 5.3
            _PIDFD_SPAWN = False
    return _PIDFD_SPAWN


class _SpawnedChild:
    """A child started by posix_spawn and reaped when its pidfd turns readable.

    Cheaper than asyncio's subprocess, which costs about 1.5 ms a program here: that
    needs the /bin/sh prologue for fd 3 (posix_spawn's dup2 actions place any
    descriptor, so the program is exec'd directly) and a watcher thread per child
    (a pidfd is just another descriptor for the loop). posix_spawn is vfork-fast
    and safe with threads. It is asyncio.subprocess.Process as far as run_program
    uses one: pid, returncode, wait().
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        args: list[str],
        env: Mapping[str, str] | None,
        fds: Mapping[int, int],  # child descriptor -> ours; a missing 0 means /dev/null
    ) -> None:
        # Ours are close-on-exec and numbered above 9, so no dup2 below overwrites
        # a descriptor that a later one still has to copy.
        high = {child: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for child, fd in fds.items()}
        actions: list[tuple[Any, ...]] = []
        if 0 not in high:
            actions.append((os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0))
        actions += [(os.POSIX_SPAWN_DUP2, fd, child) for child, fd in high.items()]
        try:
            self.pid = os.posix_spawnp(
                args[0], args, os.environ if env is None else env,
                file_actions=actions, setsid=True,  # its own group, killed as one
            )  # fmt: skip
        finally:
            for fd in high.values():
                os.close(fd)
        self.returncode: int | None = None
        self._loop = loop
        self._exited: asyncio.Future[None] = loop.create_future()
        self._pidfd = os.pidfd_open(self.pid)
        loop.add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped by someone else: the status is lost
            pid, status = self.pid, 255 << 8
        if pid == 0:
            return
        self.returncode = os.waitstatus_to_exitcode(status)
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        if not self._exited.done():
            self._exited.set_result(None)

    async def wait(self) -> int:
        await asyncio.shield(self._exited)
        assert self.returncode is not None
        return self.returncode


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class _Reader:
    """Reads a pipe from the event loop until EOF, keeping the first `limit` bytes.

    Reading goes on past the limit, so a chatty program never blocks on a full pipe.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, limit: int) -> None:
        self.loop, self.fd, self.limit = loop, fd, limit
        self.data = bytearray()
        self.eof: asyncio.Future[None] = loop.create_future()
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._ready)

    def _ready(self) -> None:
        try:
            chunk = os.read(self.fd, CHUNK)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.close()
            return
        room = self.limit - len(self.data)
        if room > 0:
            self.data += chunk[:room]

    def close(self) -> None:
        if self.fd >= 0:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
        if not self.eof.done():
            self.eof.set_result(None)


class _Writer:
    """Writes `data` into a pipe as the program reads it, then closes the pipe (EOF)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, data: bytes) -> None:
        self.loop, self.fd = loop, fd
        self.rest = memoryview(data)
        os.set_blocking(fd, False)
        if self.rest:
            loop.add_writer(fd, self._ready)
        else:
            self.close()

    def _ready(self) -> None:
        try:
            written = os.write(self.fd, self.rest[:CHUNK])
        except BlockingIOError:
            return
        except OSError:  # EPIPE: the program closed its end without reading everything
            written = len(self.rest)
        self.rest = self.rest[written:]
        if not self.rest:
            self.close()

    def close(self) -> None:
        if self.fd >= 0:
            self.loop.remove_writer(self.fd)
            os.close(self.fd)
            self.fd = -1
