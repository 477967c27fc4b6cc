from auth_backends.kinds import TEXT, Backend, Option

BACKEND = Backend(
    "authfile",
    module="auth_backends.authfile",
    flags=("-a", "--authfile"),
    metavar="FILE",
    arg="path",
    help="user:password file, mode 0400 or 0600; user names case-insensitive",
    options=(
        Option(
            "path",
            TEXT,
            "the user:password file",
            required='path must name the user:password file, e.g. path = "..."',
        ),
    ),
)
