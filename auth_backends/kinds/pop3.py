from auth_backends.kinds import Backend
from auth_backends.kinds.imap import REMOTE_OPTIONS

BACKEND = Backend(
    "pop3",
    module="auth_backends.pop3",
    schemes=("pop3", "pop3s", "apop"),
    url="pop3[s]://HOST[:PORT] or apop://HOST[:PORT]",
    arg="url",
    help="a USER/PASS (or APOP) login on a remote POP3 server",
    options=REMOTE_OPTIONS,
)
