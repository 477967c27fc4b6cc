from auth_backends.kinds import INTEGER, SECONDS, TEXT, Backend, Option

BACKEND = Backend(
    "htpasswd",
    module="auth_backends.htpasswd",
    flags=("--htpasswd",),
    metavar="FILE",
    arg="path",
    needs="libpass",
    help="Apache htpasswd file (bcrypt, apr1, SHA, sha256/512-crypt)",
    options=(
        Option(
            "path",
            TEXT,
            "the htpasswd file",
            required='path must name the htpasswd file, e.g. path = "..."',
        ),
        Option("workers", INTEGER, "threads hashing at once (default: CPU count)", low=1, high=256),
        Option("timeout", SECONDS, "longest wait for a free worker", 10.0),
    ),
)
