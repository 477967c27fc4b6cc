from auth_backends.declaration import BOOLEAN, SECONDS, TEXT, Backend, Option

# Shared with pop3; also accepted as ?key=value in the -R URL (but url).
REMOTE_OPTIONS = (
    Option("url", TEXT, "the server, as for -R", required='needs url = "SCHEME://HOST[:PORT]"'),
    Option("timeout", SECONDS, "whole login dialogue", 10.0, high=300),
    Option("ipauthmap", TEXT, "with host 0.0.0.0: map of local address to server"),
    Option("fallback", TEXT, "server for addresses not in the map, or none", "127.0.0.1"),
    Option("ca_file", TEXT, "CA certificates for TLS URLs"),
    Option("verify", BOOLEAN, "check the server's certificate", True),
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
