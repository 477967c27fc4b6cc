from auth_backends.kinds import BOOLEAN, SECONDS, TEXT, Backend, Option

# Shared with pop3; all but url may also be given as the URL's ?name=value.
REMOTE_OPTIONS = (
    Option("url", TEXT, "the server, as for -R", required='needs url = "SCHEME://HOST[:PORT]"'),
    Option("timeout", SECONDS, "whole login dialogue", 10.0, high=300, in_url=True),
    Option("ipauthmap", TEXT, "with host 0.0.0.0: map of local address to server", in_url=True),
    Option(
        "fallback", TEXT, "server for addresses not in the map, or none", "127.0.0.1", in_url=True
    ),
    Option("ca_file", TEXT, "CA certificates for TLS URLs", in_url=True),
    Option("verify", BOOLEAN, "check the server's certificate", True, in_url=True),
)

BACKEND = Backend(
    "imap",
    module="auth_backends.imap",
    schemes=("imap", "imaps"),
    url="imap[s]://HOST[:PORT]",
    arg="url",
    help="a LOGIN on a remote IMAP server",
    options=REMOTE_OPTIONS,
)
