from auth_backends.kinds import BOOLEAN, INTEGER, SECONDS, TEXT, Backend, Option

BACKEND = Backend(
    "ldap",
    module="auth_backends.ldap",
    schemes=("ldap", "ldaps"),
    url="ldap[s]://HOST[:PORT]/DN-TEMPLATE",
    needs="python-ldap",
    help="LDAP bind as a DN template (uid=%s,...) or search-then-bind",
    options=(
        Option("uri", "URL or list", "ldap[s]://HOST[:PORT], several for failover"),
        Option("dn_template", TEXT, "DN to bind as, %s is the user name"),
        Option("base", TEXT, "search-then-bind: where to search"),
        Option("scope", TEXT, "sub, one or base", "sub"),
        Option("filter", TEXT, "search filter, %s is the user name", "(uid=%s)"),
        Option("bind_dn", TEXT, "service account for the search (default: anonymous)"),
        Option("bind_password_file", TEXT, "file holding bind_dn's password"),
        Option("starttls", BOOLEAN, "STARTTLS on ldap:// URIs", False),
        Option("ca_file", TEXT, "CA certificates for TLS"),
        Option("network_timeout", SECONDS, "connect timeout", 5.0, high=3600),
        Option("timeout", SECONDS, "timeout of one operation", 10.0, high=3600),
        Option("workers", INTEGER, "threads calling python-ldap at once", 4, low=1, high=256),
        Option("user_attribute", TEXT, "attribute holding the canonical user name"),
    ),
)
