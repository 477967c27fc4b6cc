"""What a backend says about itself, as twisted's ICheckerFactory: kind, flag, help, options.

One `Backend` per kind, declared at the end of this module; the implementation lives in
the module its `module=` names. From the declaration come the command-line flags and
`--help` (ofmipd.cli), the README's table (`python -m auth_backends --markdown`) and the
checking of a BackendSpec's options (`Backend.settings`), so that every backend reports an
unknown setting or a wrong type the same way.

Every `ofmipd -1` reads all the declarations to build its command line, so they are one
module of plain classes (not NamedTuples), holding no implementation: a module per kind
cost each start-up about 1.2 ms more, in imports alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ofmipd.errors import ConfigError

if TYPE_CHECKING:
    from ofmipd.config import BackendSpec

# Option types that are checked here; any other is a description for the docs, and the
# backend checks the value itself (a command line or argv, a list of URIs...).
TEXT = "text"
INTEGER = "integer"
SECONDS = "seconds"
BOOLEAN = "true/false"


class Option:
    """One setting of a backend: a TOML key, also a `?key=value` of a URL where it says so."""

    __slots__ = ("default", "help", "high", "in_url", "low", "name", "required", "type")

    def __init__(
        self,
        name: str,
        type: str,
        help: str,
        default: Any = None,
        *,
        low: float | None = None,
        high: float | None = None,
        required: str = "",  # the error when it is missing; "" means optional
        in_url: bool = False,  # may be given as the -R URL's ?name=value, as text
    ) -> None:
        self.name = name
        self.type = type
        self.help = help
        self.default = default
        self.low = low
        self.high = high
        self.required = required
        self.in_url = in_url

    def check(self, value: Any) -> Any:
        if self.in_url and isinstance(value, str):
            value = self._from_text(value)
        if self.type == TEXT:
            # Empty is "not set" in a URL (?fallback=), and has always been in TOML too.
            if not isinstance(value, str) or not (value or self.in_url):
                raise ConfigError(self.required or f"{self.name} must be a non-empty string")
        elif self.type == BOOLEAN:
            if not isinstance(value, bool):
                raise ConfigError(f"{self.name} must be true or false, not {value!r}")
        elif self.type in (INTEGER, SECONDS):
            number = int if self.type == INTEGER else int | float
            if isinstance(value, bool) or not isinstance(value, number):
                raise ConfigError(self._range_text())
            if not self._in_range(value):
                raise ConfigError(self._range_text())
            return float(value) if self.type == SECONDS else value
        return value

    def _from_text(self, text: str) -> Any:
        """A URL's text as the option's type; left as it is when it does not convert."""
        if self.type == BOOLEAN:
            return {"1": True, "yes": True, "true": True, "on": True, "0": False, "no": False,
                    "false": False, "off": False}.get(text.lower(), text)  # fmt: skip
        if self.type == SECONDS:
            try:
                return float(text)
            except ValueError:
                return text
        return text

    def _in_range(self, value: float) -> bool:
        if self.type == SECONDS and value <= 0:
            return False
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)

    def _range_text(self) -> str:
        if self.type == INTEGER:
            return f"{self.name} must be a whole number from {self.low} to {self.high}"
        upto = f" up to {self.high:g}" if self.high is not None else ""
        return f"{self.name} must be a positive number of seconds{upto}"

    def describe(self) -> str:
        """`name` (type, default X): help, for --help and the README."""
        default = "" if self.default is None else f", default {self._shown(self.default)}"
        return f"`{self.name}` ({self.type}{default}): {self.help}"

    @staticmethod
    def _shown(value: Any) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, float):
            return f"{value:g}"
        return f'"{value}"' if isinstance(value, str) else str(value)  # as written in TOML


class Settings:
    """The options of one BackendSpec, checked: `settings[key]` falls back to the default,
    `key in settings` says whether it was given."""

    __slots__ = ("backend", "given", "where")

    def __init__(self, backend: Backend, given: dict[str, Any], where: str) -> None:
        self.backend = backend
        self.given = given
        self.where = where

    def __contains__(self, key: str) -> bool:
        return key in self.given

    def __getitem__(self, key: str) -> Any:
        if key in self.given:
            return self.given[key]
        return self.backend.option(key).default

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.where}: {message}")


class Backend:
    """A backend's declaration: everything about it that is not its implementation."""

    __slots__ = (
        "arg",
        "flags",
        "help",
        "kind",
        "metavar",
        "module",
        "needs",
        "options",
        "schemes",
        "url",
    )

    def __init__(
        self,
        kind: str,
        *,
        module: str,  # the implementation: a module with create(spec) -> Authenticator
        help: str,  # one line
        options: tuple[Option, ...] = (),
        flags: tuple[str, ...] = (),  # its own flag, e.g. ("-a", "--authfile")
        metavar: str = "",
        arg: str | None = None,  # the option the flag's value (or -R URL) sets
        schemes: tuple[str, ...] = (),  # -R URL schemes that choose this backend
        url: str = "",  # the -R URL's shape, for --help
        needs: str = "",  # a library that may be missing from the installation
    ) -> None:
        self.kind = kind
        self.module = module
        self.help = help
        self.options = options
        self.flags = flags
        self.metavar = metavar
        self.arg = arg
        self.schemes = schemes
        self.url = url
        self.needs = needs

    def option(self, name: str) -> Option:
        for option in self.options:
            if option.name == name:
                return option
        raise KeyError(name)

    def where(self, spec: BackendSpec) -> str:
        """How the admin wrote it, for the front of an error line."""
        if spec.arg is None:
            return f'[[auth]] kind="{self.kind}"'
        if self.schemes:
            from ofmipd.logs import redact_url

            return f"-R {redact_url(spec.arg)}"
        shown = f'"{spec.arg}"' if any(c.isspace() for c in spec.arg) else spec.arg
        return f"{self.flags[0]} {shown}"

    def settings(self, spec: BackendSpec) -> Settings:
        """Check the spec's options against the declaration; the flag's value fills `arg`."""
        where = self.where(spec)
        given: dict[str, Any] = dict(spec.options)
        if spec.arg is not None and self.arg is not None:
            given[self.arg] = spec.arg
        names = {option.name for option in self.options}
        unknown = sorted(set(given) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown setting {unknown[0]!r}")
        if isinstance(given.get("url"), str):
            self._add_query(given, where)
        for option in self.options:
            try:
                if option.name in given:
                    given[option.name] = option.check(given[option.name])
                elif option.required:
                    raise ConfigError(option.required)
            except ConfigError as error:
                raise ConfigError(f"{where}: {error}") from None
        return Settings(self, given, where)

    def _add_query(self, given: dict[str, Any], where: str) -> None:
        """A URL's ?name=value options; a table's own setting of the same name wins."""
        from urllib.parse import parse_qsl, urlsplit

        try:
            query = urlsplit(given["url"]).query
        except ValueError:
            return  # the backend reports the malformed URL, with its own words
        in_url = {option.name for option in self.options if option.in_url}
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key not in in_url:
                raise ConfigError(f"{where}: unknown option {key!r}")
            given.setdefault(key, value)

    def markdown_row(self) -> str:
        """flag | kind | help | options: one row of the README's table."""
        flag = f"`{self.flags[0]} {self.metavar}`" if self.flags else f"`-R {self.url}`"
        options = "<br>".join(option.describe() for option in self.options)
        cells = (flag, f"`{self.kind}`", self.help, options)
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


# ---- The declarations, in the order --help and the README list them ----------------------

AUTHFILE = Backend(
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

HTPASSWD = Backend(
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

CHECKPASSWORD = Backend(
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

PAM = Backend(
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

LDAP = Backend(
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

# Shared with pop3; all but url may also be given as the URL's ?name=value.
REMOTE_OPTIONS = (
    Option("url", TEXT, "the server, as for -R", required='needs url = "SCHEME://HOST[:PORT]"'),
    Option("timeout", SECONDS, "whole login dialogue", 20.0, high=300, in_url=True),
    Option("ipauthmap", TEXT, "with host 0.0.0.0: map of local address to server", in_url=True),
    Option(
        "fallback", TEXT, "server for addresses not in the map, or none", "127.0.0.1", in_url=True
    ),
    Option(
        "tls",
        TEXT,
        "imap://, pop3://, apop://: auto (STARTTLS when offered; cleartext only to a "
        "loopback address), starttls (required), none (cleartext, warned at start)",
        "auto",
        in_url=True,
    ),
    Option("ca_file", TEXT, "CA certificates for TLS and STARTTLS", in_url=True),
    Option("verify", BOOLEAN, "check the server's certificate", True, in_url=True),
)

IMAP = Backend(
    "imap",
    module="auth_backends.imap",
    schemes=("imap", "imaps"),
    url="imap[s]://HOST[:PORT]",
    arg="url",
    help="a LOGIN on a remote IMAP server",
    options=REMOTE_OPTIONS,
)

POP3 = Backend(
    "pop3",
    module="auth_backends.pop3",
    schemes=("pop3", "pop3s", "apop"),
    url="pop3[s]://HOST[:PORT] or apop://HOST[:PORT]",
    arg="url",
    help="a USER/PASS (or APOP) login on a remote POP3 server",
    options=REMOTE_OPTIONS,
)

PASSWD_FILE = Backend(
    "passwd-file",
    module="auth_backends.passwd_file",
    flags=("--passwd-file",),
    metavar="FILE",
    arg="path",
    needs="libpass",
    # No hyphenated words: argparse may wrap --help there, which a test would not find.
    help="Dovecot user file with app passwords; mode 0600 or 0640 (SCRAM, bcrypt, argon2id,"
    " SHA crypt, SSHA512, PLAIN)",
    options=(
        Option(
            "path",
            TEXT,
            "the user file",
            required='path must name the passwd-file, e.g. path = "..."',
        ),
        Option("workers", INTEGER, "threads hashing at once (default: CPU count)", low=1, high=256),
        Option("timeout", SECONDS, "longest wait for a free worker", 10.0),
    ),
)

DECLARED = (AUTHFILE, HTPASSWD, CHECKPASSWORD, PAM, LDAP, IMAP, POP3, PASSWD_FILE)
BY_KIND = {backend.kind: backend for backend in DECLARED}
