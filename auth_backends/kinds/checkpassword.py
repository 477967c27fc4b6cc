from auth_backends.kinds import SECONDS, Backend, Option

BACKEND = Backend(
    "checkpassword",
    module="auth_backends.checkpassword",
    flags=("-A", "--authprog"),
    metavar="PROGRAM",
    arg="command",
    help='checkpassword program and arguments, e.g. "checkpassword-pam -s id -- /bin/true"',
    options=(
        Option(
            "command",
            "command line or argv list",
            "run by /bin/sh if a string; user NUL password NUL NUL on fd 3",
            required='needs command = "PROGRAM ARGS"',
        ),
        Option("timeout", SECONDS, "the program is killed after this", 10.0),
        Option("reject_codes", "list of exit codes", "exit codes that mean a wrong password", [1]),
    ),
)
