from auth_backends.kinds import INTEGER, SECONDS, TEXT, Backend, Option

BACKEND = Backend(
    "pam",
    module="auth_backends.pam",
    flags=("-m", "--pamauth"),
    metavar="SERVICE",
    arg="service",
    needs="python-pam",
    help="PAM service name (authenticate and account management)",
    options=(
        Option(
            "service",
            TEXT,
            "the PAM service, a file in /etc/pam.d",
            required='service must be a PAM service name like "ofmipd"',
        ),
        Option("workers", INTEGER, "threads calling PAM at once", 4, low=1, high=256),
        Option("timeout", SECONDS, "longest wait for a free worker", 10.0),
    ),
)
