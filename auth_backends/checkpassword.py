"""checkpassword authenticator: DJB's interface, user NUL password NUL timestamp NUL on fd 3.

https://cr.yp.to/checkpwd/interface.html: exit 0 accepts, 1 rejects, 2 is misuse and 111 a
temporary problem. Every code but 0 and the reject codes, a signal or a timeout is a
temporary failure, because the program might have said yes. vpopmail's vchkpw exits 3
for a wrong password or unknown user; `reject_codes = [1, 3]` in TOML says so.

The timestamp is empty. The interface says it carries "any other information that the
password is based on", such as an APOP challenge; a PLAIN or LOGIN password is based on
nothing, qmail-smtpd's AUTH patches send it empty too, and vchkpw would otherwise test the
password as a CRAM-MD5 or APOP answer to our timestamp before comparing it as a password.

The program sees our environment plus the client's ucspi variables (TCPREMOTEIP and
friends, which vchkpw logs and uses), so it can tell clients apart. The password goes
only through the pipe: never into argv, the environment or a log line.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
from collections.abc import Sequence

from auth_backends.kinds import CHECKPASSWORD as BACKEND
from ofmipd import proc
from ofmipd.auth import Outcome, Secret, Verdict, accept, reject, tempfail
from ofmipd.config import BackendSpec
from ofmipd.errors import ConfigError
from ofmipd.identity import LAUNCHER_VARIABLES, ClientIdentity, launcher_environment
from ofmipd.logs import printable

log = logging.getLogger("ofmipd.checkpassword")

DEFAULT_TIMEOUT = 10.0
TRUE = "/bin/true"  # the "prog" a checkpassword program runs on success; TMDA appended it too
MAX_DATA = 512  # the interface's limit for what is written to fd 3
STDERR_LIMIT = 4096
STDERR_LINES = 10
STDERR_LINE_CHARS = 300
TEMPORARY = 111  # the interface's "temporary problem"; never a rejection


class CheckPassword:
    name = "checkpassword"

    def __init__(
        self,
        argv: Sequence[str],
        target: str,
        timeout: float = DEFAULT_TIMEOUT,
        reject_codes: frozenset[int] = frozenset({1}),
    ) -> None:
        self.argv = list(argv)
        self.target = target
        self.timeout = timeout
        self.reject_codes = reject_codes

    async def verify(self, user: str, secret: Secret, client: ClientIdentity) -> Outcome:
        data = b"%s\0%s\0\0" % (user.encode("utf-8"), secret.reveal())
        if len(data) > MAX_DATA:
            return reject(f"user name and password longer than checkpassword's {MAX_DATA} bytes")
        env = proc.environment(launcher_environment(client), drop=LAUNCHER_VARIABLES)
        result = await proc.run_program(
            self.argv,
            timeout=self.timeout,
            env=env,
            pass_fds_data={3: data},
            output_limit=STDERR_LIMIT,
        )
        outcome = self.judge(result)
        _log_stderr(result.stderr, secret, user, outcome)
        return outcome

    def judge(self, result: proc.ProgramResult) -> Outcome:
        reason = f"checkpassword {result.describe()}"
        if result.timed_out or result.exit_code is None:
            return tempfail(reason)
        if result.exit_code == 0:
            return accept(reason)
        if result.exit_code in self.reject_codes:
            return reject(reason)
        return tempfail(reason)


def _log_stderr(stderr: bytes, secret: Secret, user: str, outcome: Outcome) -> None:
    """Log what the program said, at most a few lines, with the password cut out."""
    if not stderr:
        return
    if len(stderr) >= STDERR_LIMIT:  # the last line may end inside a password: drop it
        stderr = stderr[: stderr.rfind(b"\n") + 1]
    text = stderr.replace(secret.reveal(), b"<redacted>").decode("utf-8", "replace")
    level = logging.WARNING if outcome.verdict is Verdict.TEMPFAIL else logging.INFO
    for line in text.splitlines()[:STDERR_LINES]:
        # The program may echo the user name, and its own text is not ours to trust.
        log.log(
            level,
            "checkpassword for %s said: %s",
            printable(user),
            printable(line, STDERR_LINE_CHARS),
        )


def _check_program(word: str, where: str) -> None:
    if "/" in word:
        if not (os.path.isfile(word) and os.access(word, os.X_OK)):
            raise ConfigError(f"{where}: {word} is not an executable file")
    elif shutil.which(word) is None:
        raise ConfigError(f"{where}: {word} not found in PATH")


def parse_command(command: object, where: str) -> tuple[list[str], str]:
    """The argv to run and the text shown as target, from a -A string or a TOML value.

    A string is a command line for /bin/sh, as tmda-ofmipd ran it (plain words run
    without the shell); a list is an argv, never given to a shell. A lone program gets
    /bin/true as the program checkpassword runs on success, as tmda-ofmipd did.
    """
    if isinstance(command, str):
        try:
            words = shlex.split(command)
        except ValueError as error:
            raise ConfigError(f"{where}: cannot parse the command: {error}") from None
        if not words:
            raise ConfigError(f"{where}: the command is empty")
        if len(words) == 1:
            command = f"{command.strip()} {TRUE}"
        argv = proc.command_argv(command)
        if argv[0] != proc.SHELL:  # what a shell command runs is the admin's business
            _check_program(argv[0], where)
        return argv, command.strip()
    if (
        isinstance(command, list)
        and command
        and all(isinstance(w, str) and w and "\0" not in w for w in command)
    ):
        argv = list(command) if len(command) > 1 else [*command, TRUE]
        _check_program(argv[0], where)
        return argv, shlex.join(argv)
    raise ConfigError(f"{where}: command must be a command line or a list of arguments")


def create(spec: BackendSpec) -> CheckPassword:
    settings = BACKEND.settings(spec)
    argv, target = parse_command(settings["command"], settings.where)
    codes = settings["reject_codes"]
    if (
        not isinstance(codes, list)
        or not codes
        or not all(
            isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= 255 and c != TEMPORARY
            for c in codes
        )
    ):
        raise settings.error(
            f"reject_codes must be a list of exit codes from 1 to 255, without 0"
            f" and {TEMPORARY} (the interface's temporary failure)"
        )
    return CheckPassword(argv, target, settings["timeout"], frozenset(codes))
