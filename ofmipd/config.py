"""Configuration as immutable records (NamedTuples), from TOML merged with command-line flags.

Each setting is declared once, in SETTINGS: its Config field, its flag and its TOML key.
cli.build_parser makes the flags from it, from_mapping reads TOML with it. Flags win over
the file. Backends keep the order they were given in. Every
problem becomes one ConfigError line; ofmipd prints it and exits 2.
"""

# No `from __future__ import annotations` here: typing.NamedTuple would compile each of
# Config's 39 string annotations at import (~0.5 ms), which every `ofmipd -1` pays.
import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

from ofmipd.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable

TLS_MODES = ("optional", "localoptional", "on")
DEFAULT_MAX_PER_IP = 10
LOOPBACK = ("127.0.0.0/8", "::1/128")  # --tls-in-front without a list


class Listen:
    """An address to listen on. A plain class: a NamedTuple costs every start-up ~0.1 ms."""

    __slots__ = ("host", "port")

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Listen):
            return NotImplemented
        return (self.host, self.port) == (other.host, other.port)

    def __hash__(self) -> int:
        return hash((self.host, self.port))

    def __repr__(self) -> str:
        return f"Listen(host={self.host!r}, port={self.port!r})"

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class BackendSpec(NamedTuple):
    """One configured backend: from a flag (`arg`) or a TOML [[auth]] table (`options`).

    The kind is a name, not a module: auth_backends' registry resolves it when the chain
    is built, so configuration does not depend on the plug-ins."""

    kind: str
    arg: str | None = None  # the flag's value, e.g. the -R URL or -A command line
    options: Mapping[str, Any] = MappingProxyType({})  # shared, so read-only

    def describe(self) -> str:
        return f"{self.kind} {self.arg}" if self.arg else self.kind


class Config(NamedTuple):
    listen: tuple[Listen, ...] = ()
    one_session: bool = False
    connections: int = 100  # like Postfix's default_process_limit
    workers: int = 1  # processes sharing the listening sockets
    background: bool = False
    username: str | None = None
    hostname: str | None = None
    debug: bool = False
    log: bool = False
    syslog: bool = False
    auth: tuple[BackendSpec, ...] = ()
    auth_timeout: float = 30.0
    scram_final: str | None = None  # None: "334" (a last challenge); "235": in the reply
    sendmail: str | None = None
    maildir: str | None = None
    injector_exits: str | None = None  # None: "sysexits"; see delivery.INJECTOR_EXITS
    relay: str | None = None  # smtp://HOST[:PORT] or smtps://HOST[:PORT] (ofmipd.relay)
    relay_tls: str = "opportunistic"
    relay_connections: int = 10
    relay_identity: str = "auto"
    relay_auth: str | None = None  # USER:PASSWORD-FILE, AUTH PLAIN to the relay over TLS
    throttle_script: str | None = None
    delivery_timeout: float = 300.0
    ssl: bool = False
    tls: str | None = None
    ssl_cert: str | None = None
    ssl_key: str | None = None
    ciphers: str | None = None
    tls_in_front: tuple[str, ...] = ()  # CIDRs of trusted TLS terminators; () is off
    rules: str | None = None
    rule_tables: tuple[dict[str, Any], ...] = ()  # TOML [[rule]] tables
    proxy_protocol: tuple[str, ...] = ()
    size_limit: int = 35 * 1024 * 1024
    idle_timeout: float = 300.0
    ehlo_timeout: float = 20.0  # connect to EHLO/HELO, PROXY header and TLS handshake included
    max_recipients: int = 100
    data_timeout: float = 600.0
    max_errors: int = 20  # like Postfix's smtpd_hard_error_limit
    max_commands: int = 1000  # per command name and session
    max_per_ip: int | None = None  # simultaneous sessions from one address; see per_ip_limit
    sender_map: str | None = None
    ratelimit: str | None = None  # None: "sqlite" (in state_dir); "memory", "redis://...", "off"
    ratelimit_fail_open: bool = True
    ratelimit_options: tuple[tuple[str, Any], ...] = ()  # TOML [ratelimit] settings
    quota: tuple[Any, ...] = ()  # ofmipd.quota.Quota: --quota flags or [[quota]] tables
    quota_reply: str = "temporary"  # over quota: 450/452, or "permanent": 550 5.7.1
    state_dir: str | None = None  # None: $STATE_DIRECTORY, else /var/lib/ofmipd
    metrics: str | None = None  # HOST:PORT of a Prometheus endpoint
    reverse_dns: bool = True
    bare_newline: str = "normalize"  # a bare LF or CR in DATA: "normalize" or "reject"
    add_message_id: bool = True  # RFC 6409 §8.3, authenticated sessions only
    add_date: bool = True  # RFC 6409 §8.2, likewise
    check_header_from: bool = False  # header From/Sender must be the login's (--sender-map)
    # --policy services in order, as BackendSpec("policy", SERVICE, [[policy]] options):
    # one more record class would cost every start-up; ofmipd.policy_client checks them.
    policy: tuple[BackendSpec, ...] = ()
    policy_timeout: float = 10.0  # see ofmipd.policy_client.DEFAULT_TIMEOUT
    policy_default_action: str = "451 4.3.5 Server configuration problem"
    source: str = "command line"

    @property
    def listeners(self) -> tuple[Listen, ...]:
        return self.listen or (Listen("127.0.0.1", 8025),)

    @property
    def per_ip_limit(self) -> int:
        """--max-per-ip, by default 10 and at most a quarter of -C: one address (or one
        NAT) must not be able to take every slot. Postfix allows half its process limit,
        which two addresses fill; a mail client holds one or two submission sessions."""
        if self.max_per_ip is not None:
            return self.max_per_ip
        return max(1, min(DEFAULT_MAX_PER_IP, self.connections // 4))

    @property
    def sendmail_program(self) -> str:
        return (
            self.sendmail
            or os.environ.get("OFMIPD_SENDMAIL")
            or os.environ.get("TMDA_SENDMAIL_PROGRAM")
            or "/usr/sbin/sendmail"
        )


def parse_listen(text: str, *, ipv6: bool = False) -> Listen:
    """HOST:PORT, [V6]:PORT, or (for -6, as tmda-ofmipd took it) V6:PORT."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ConfigError(f"listen address {text!r}: expected [ADDRESS]:PORT")
    elif ":" in text:
        host, _, port = text.rpartition(":")
    else:
        raise ConfigError(f"listen address {text!r}: expected HOST:PORT")
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ConfigError(f"listen address {text!r}: bad port {port!r}")
    if ipv6 and ":" not in host and host not in ("", "localhost"):
        raise ConfigError(f"-6 {text!r}: {host} is not an IPv6 address")
    return Listen(host or ("::" if ipv6 else "0.0.0.0"), int(port))


def load_toml(path: str) -> Config:
    import tomllib  # only configurations that use a file pay for the parser

    from ofmipd.secretfile import warn_if_shared

    try:
        with open(path, "rb") as handle:
            warn_if_shared(os.fstat(handle.fileno()), path, "config")  # a Redis URL's password
            data = tomllib.load(handle)
    except OSError as error:
        raise ConfigError(f"config {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config {path}: {error}") from None
    return from_mapping(data, source=path)


def _take(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = table.pop(key, None)
    if value is not None and not isinstance(value, kind):
        names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
        raise ConfigError(f"{where}: {key} must be {names}")
    return value


def from_mapping(data: dict[str, Any], *, source: str) -> Config:
    """Turn a parsed TOML document into a Config; unknown keys are errors, not silence."""
    data = dict(data)
    values: dict[str, Any] = {"source": source}
    _take_ratelimit_table(data, values)
    tables = {name: dict(_take(data, name, dict, source) or {}) for name in TOML_TABLES}
    for setting in SETTINGS:
        if setting.toml is None or setting.field is None:
            continue
        table, _, key = setting.toml.rpartition(".")
        where = f"{source} [{table}]" if table else source
        value = _take(tables[table] if table else data, key, setting.toml_types, where)
        if value is not None:
            values[setting.field] = setting.from_toml(value) if setting.from_toml else value
    specs = auth_specs(_take(data, "auth", list, source) or [], source)
    if specs:
        values["auth"] = specs
    for name, leftovers in tables.items():
        _no_leftovers(leftovers, f"{source} [{name}]")
    _no_leftovers(data, source)
    return Config(**values)


def auth_specs(tables: list[Any], source: str) -> tuple[BackendSpec, ...]:
    """[[auth]] tables as given: the registry checks the kind and its options when the
    chain is built (also by --check-config), so this module needs no plug-in."""
    specs = []
    for number, table in enumerate(tables, 1):
        if not isinstance(table, dict) or "kind" not in table:
            raise ConfigError(f'{source}: [[auth]] entry {number} needs kind = "..."')
        options = dict(table)
        kind = str(options.pop("kind"))
        specs.append(BackendSpec(kind=kind, options=options))
    return tuple(specs)


def _take_ratelimit_table(data: dict[str, Any], values: dict[str, Any]) -> None:
    """[ratelimit] store = "redis://..." max_failures = 5 ...: the store, and the rest for the
    limiter to check. (ratelimit = "redis://..." alone is an ordinary setting.)"""
    if not isinstance(data.get("ratelimit"), dict):
        return
    options = dict(data.pop("ratelimit"))
    store = options.pop("store", None)
    if store is not None:
        values["ratelimit"] = str(store)
    values["ratelimit_options"] = tuple(sorted(options.items()))


def from_flags(args: Any) -> dict[str, Any]:
    """The settings given on the command line (an argparse Namespace built by
    cli.build_parser from SETTINGS), by Config field; a flag not given is left out."""
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        given = getattr(args, setting.dest, None) if setting.flags else None
        if setting.field is None or given is None:
            continue
        convert = setting.from_flag
        if setting.repeat:  # -p and -6 both add listeners
            more = tuple(convert(x) for x in given) if convert else tuple(given)
            values[setting.field] = values.get(setting.field, ()) + more
        else:
            values[setting.field] = convert(given) if convert else given
    return values


def tls_in_front_list(value: bool | str | list[Any]) -> tuple[str, ...]:
    """--tls-in-front [CIDR,...] or TOML tls_in_front = true | "CIDR,..." | ["CIDR", ...]:
    the peers believed to encrypt the channel. true or no list means loopback, as the
    recipes and tmda-ofmipd's --tls-in-front (no value) expect."""
    if value is True:
        return LOOPBACK
    if value is False:
        return ()
    entries = value.split(",") if isinstance(value, str) else [str(x) for x in value]
    cidrs = tuple(entry.strip() for entry in entries if entry.strip())
    if not cidrs:
        raise ConfigError("--tls-in-front: expected CIDR networks (in TOML, or true or false)")
    return cidrs


def _no_leftovers(table: dict[str, Any], where: str) -> None:
    if table:
        raise ConfigError(f"{where}: unknown setting {sorted(table)[0]!r}")


def _listen_list(value: str | list[Any]) -> tuple[Listen, ...]:
    return tuple(parse_listen(x) for x in ([value] if isinstance(value, str) else value))


def _listen_v6(text: str) -> Listen:
    return parse_listen(text, ipv6=True)


def _cidr_list(value: str | list[Any]) -> tuple[str, ...]:
    """--proxy-protocol CIDR,CIDR or TOML "CIDR,CIDR" | ["CIDR", ...]."""
    if isinstance(value, str):
        return tuple(x for x in value.split(",") if x.strip())
    return tuple(value)


def _quota_flag(text: str) -> Any:
    from ofmipd.quota import parse_quota  # only configurations with quotas load it

    return parse_quota(text)


def _quota_tables(tables: list[Any]) -> tuple[Any, ...]:
    from ofmipd.quota import quota_from_table

    return tuple(quota_from_table(table) for table in tables)


def _policy_spec(service: str) -> BackendSpec:
    return BackendSpec("policy", service)


def _policy_specs(value: str | list[Any]) -> tuple[BackendSpec, ...]:
    """TOML policy = "inet:..." | [[policy]] tables (service = "...", other options)."""
    specs = []
    for entry in [value] if isinstance(value, str) else value:
        if isinstance(entry, str):
            specs.append(_policy_spec(entry))
        elif isinstance(entry, dict) and isinstance(entry.get("service"), str):
            options = dict(entry)
            specs.append(BackendSpec("policy", options.pop("service"), options))
        else:
            raise ConfigError('[[policy]] needs service = "inet:HOST:PORT" or "unix:PATH"')
    return tuple(specs)


class Setting:
    """One setting, declared once: cli.build_parser makes its flag from this, from_mapping
    reads its TOML key, from_flags and validate use it, and tests/test_settings.py checks
    that flag and key mean the same. A new setting is one entry in SETTINGS (and its field
    in Config). A plain class: a NamedTuple of 13 fields costs every start-up ~0.15 ms."""

    __slots__ = (
        "field", "flags", "help", "group", "value_type", "metavar", "toml", "toml_types",
        "choices", "const", "repeat", "from_flag", "from_toml", "dest",
    )  # fmt: skip

    def __init__(
        self,
        field: str | None,  # the Config field; None for a command-line action (--check-config)
        flags: tuple[str, ...],  # () when only TOML can set it
        help: str,
        group: str = "",  # the --help section
        value_type: type = str,  # bool: a flag without a value
        metavar: str | None = None,
        *,
        toml: str | None = None,  # "key", or "table.key" for [table] key; None: flags only
        toml_type: "type | tuple[type, ...] | None" = None,  # what TOML may hold, if not value_type
        choices: tuple[str, ...] | None = None,
        const: Any = None,  # what a value-less use means: a bool flag's value (default True)
        repeat: bool = False,  # the flag may be repeated; its values add up
        from_flag: "Callable[[Any], Any] | None" = None,  # converts the (each) flag value
        from_toml: "Callable[[Any], Any] | None" = None,  # converts the TOML value
    ) -> None:
        self.field = field
        self.flags = flags
        self.help = help
        self.group = group
        self.value_type = value_type
        self.metavar = metavar
        self.toml = toml
        if toml_type is None:
            toml_type = (int, float) if value_type is float else value_type
        self.toml_types = toml_type
        self.choices = choices
        self.const = const
        self.repeat = repeat
        self.from_flag = from_flag
        self.from_toml = from_toml
        # The argparse name: from the long flag, which comes last (-C, --connections).
        self.dest = flags[-1].lstrip("-").replace("-", "_") if flags else ""

    def __repr__(self) -> str:
        return f"Setting({self.field!r}, {self.flags!r}, toml={self.toml!r})"


GENERAL = "general"
CONNECTIONS = "connections"
TLS = "TLS"
DELIVERY = "delivery"
LIMITS = "limits and abuse resistance"
TOML_TABLES = ("tls", "delivery", "log", "relay")  # [table] key; the [ratelimit] table is its own

# In --help order, group by group; the authentication flags come from auth_backends.
SETTINGS = (
    Setting("debug", ("-d", "--debug"), "protocol trace (AUTH payloads and passwords redacted)",
            GENERAL, bool, toml="log.debug"),
    Setting("log", ("-L", "--log"), "log sessions and authentications to stderr",
            GENERAL, bool),
    Setting("syslog", ("--syslog",), "log to syslog", GENERAL, bool, toml="log.syslog"),
    Setting("background", ("-b", "--background"), "detach and run in the background",
            GENERAL, bool, toml="background"),
    Setting(None, ("-f", "--foreground"), "stay in the foreground (the default)", GENERAL, bool),
    Setting("username", ("-u", "--username"), "drop privileges to USER after binding",
            GENERAL, metavar="USER", toml="user"),
    Setting("hostname", ("--hostname",),
            "name in the banner and Received header (default: this host's FQDN)",
            GENERAL, metavar="FQDN", toml="hostname"),
    Setting(None, ("--check-config",), "validate the configuration, print it, exit 0 or 2",
            GENERAL, bool),
    Setting("listen", ("-p", "--proxyport"), "listen here (repeatable; default 127.0.0.1:8025)",
            CONNECTIONS, metavar="HOST:PORT", toml="listen", toml_type=(list, str), repeat=True,
            from_flag=parse_listen, from_toml=_listen_list),
    Setting("listen", ("-6", "--ipv6proxyport"),
            "listen on an IPv6 address (repeatable), e.g. [::1]:8025",
            CONNECTIONS, metavar="HOST:PORT", repeat=True, from_flag=_listen_v6),
    Setting("connections", ("-C", "--connections"),
            "simultaneous sessions (default 100); more clients wait",
            CONNECTIONS, int, "N", toml="connections"),
    Setting("workers", ("--workers",),
            "N processes share the listening sockets (default 1); -C applies per worker",
            CONNECTIONS, int, "N", toml="workers"),
    Setting("one_session", ("-1", "--one-session"),
            "one SMTP session on stdin/stdout (inetd, tcpserver, stunnel, systemd)",
            CONNECTIONS, bool, toml="one_session"),
    Setting("rules", ("--rules",), "host-based access rules", CONNECTIONS, metavar="FILE",
            toml="rules"),
    Setting("rule_tables", (), "host-based access rules as [[rule]] tables", toml="rule",
            toml_type=list, from_toml=tuple),
    Setting("proxy_protocol", ("--proxy-protocol",),
            "expect a PROXY v1/v2 header from these peers",
            CONNECTIONS, metavar="CIDR[,CIDR...]", toml="proxy_protocol", toml_type=(list, str),
            from_flag=_cidr_list, from_toml=_cidr_list),
    Setting("tls_in_front", ("--tls-in-front",),
            "a TLS terminator (stunnel, haproxy) at these peers already encrypts the channel "
            "(no list: loopback; one-session mode also trusts a socketpair or pipes)",
            CONNECTIONS, metavar="CIDR[,CIDR...]", toml="tls_in_front",
            toml_type=(bool, str, list), const=",".join(LOOPBACK),
            from_flag=tls_in_front_list, from_toml=tls_in_front_list),
    Setting("ssl", ("--ssl",), "implicit TLS from the first byte (port 465)", TLS, bool,
            toml="tls.implicit"),
    Setting("tls", ("--tls",), "offer STARTTLS: optional, localoptional or on", TLS,
            metavar="MODE", toml="tls.mode", choices=TLS_MODES),
    Setting("ssl_cert", ("--ssl-cert",), "PEM certificate (chain; may hold the key)", TLS,
            metavar="FILE", toml="tls.cert"),
    Setting("ssl_key", ("--ssl-key",), "PEM private key", TLS, metavar="FILE", toml="tls.key"),
    Setting("ciphers", ("--ciphers",), "OpenSSL cipher list for TLS 1.2", TLS, metavar="LIST",
            toml="tls.ciphers"),
    Setting("sendmail", ("--sendmail",),
            "injector (default $OFMIPD_SENDMAIL, $TMDA_SENDMAIL_PROGRAM, /usr/sbin/sendmail)",
            DELIVERY, metavar="PROGRAM", toml="delivery.sendmail"),
    Setting("maildir", ("--maildir",), "deliver into this Maildir instead", DELIVERY,
            metavar="DIR", toml="delivery.maildir"),
    Setting("injector_exits", ("--injector-exits",),
            "how --sendmail's exit status becomes the reply: sysexits (the default), qmail, "
            "msmtp, or tempfail (451 for every failure)",
            DELIVERY, metavar="PROFILE", toml="delivery.injector_exits",
            choices=("sysexits", "qmail", "msmtp", "tempfail")),
    Setting("add_message_id", ("--no-add-message-id",),
            "do not add a Message-ID to an authenticated user's message that lacks one",
            DELIVERY, bool, toml="add_message_id", const=False),
    Setting("add_date", ("--no-add-date",),
            "do not add a Date to an authenticated user's message that lacks one",
            DELIVERY, bool, toml="add_date", const=False),
    Setting("relay", ("--relay",),
            "hand messages to this MTA over SMTP instead: smtp://HOST[:PORT] or smtps://HOST[:PORT]",
            DELIVERY, metavar="URL", toml="relay.url"),
    Setting("relay_tls", ("--relay-tls",),
            "TLS to the relay: require, opportunistic (STARTTLS when offered; the default) or none",
            DELIVERY, toml="relay.tls", choices=("require", "opportunistic", "none")),
    Setting("relay_connections", ("--relay-connections",),
            "connections to the relay at most, pooled (default 10)",
            DELIVERY, int, "N", toml="relay.connections"),
    Setting("relay_identity", ("--relay-identity",),
            "pass the client downstream with xclient, xforward, none or auto (the default: "
            "whichever the relay offers)",
            DELIVERY, toml="relay.identity", choices=("auto", "xclient", "xforward", "none")),
    Setting("relay_auth", ("--relay-auth",),
            "log in to the relay with AUTH PLAIN, over TLS only; the password is the first line "
            "of the file", DELIVERY, metavar="USER:PASSWORD-FILE", toml="relay.auth"),
    Setting("throttle_script", ("-t", "--throttle-script"),
            "run with the user name before delivery; non-zero exit refuses",
            DELIVERY, metavar="PATH", toml="delivery.throttle_script"),
    Setting("size_limit", ("--size-limit",), "largest message (default 35 MiB; SIZE is advertised)",
            LIMITS, int, "BYTES", toml="size_limit"),
    Setting("max_recipients", ("--max-recipients",), "recipients per message (default 100)",
            LIMITS, int, "N", toml="max_recipients"),
    Setting("max_errors", ("--max-errors",), "error replies before 421 and close (default 20)",
            LIMITS, int, "N", toml="max_errors"),
    Setting("max_commands", ("--max-commands",), "uses of one command per session (default 1000)",
            LIMITS, int, "N", toml="max_commands"),
    Setting("max_per_ip", ("--max-per-ip",),
            "simultaneous sessions from one client address (default 10, or -C/4 if smaller)",
            LIMITS, int, "N", toml="max_per_ip"),
    Setting("idle_timeout", ("--idle-timeout",), "wait for a command at most this long "
            "(default 300)", LIMITS, float, "SECONDS", toml="idle_timeout"),
    Setting("ehlo_timeout", ("--ehlo-timeout",),
            "time from connect to EHLO/HELO, including a PROXY header and the implicit TLS "
            "handshake; NOOPs do not extend it (default 20)",
            LIMITS, float, "SECONDS", toml="ehlo_timeout"),
    Setting("data_timeout", ("--data-timeout",),
            "time allowed for a whole DATA transfer (default 600)",
            LIMITS, float, "SECONDS", toml="data_timeout"),
    Setting("delivery_timeout", ("--delivery-timeout",),
            "time allowed for the injector and throttle script (default 300)",
            LIMITS, float, "SECONDS", toml="delivery.timeout"),
    Setting("scram_final", ("--scram-final",),
            "where SCRAM's server-final message goes: 334 (a last challenge the client answers "
            "with an empty line; the default, which GNU SASL's msmtp needs) or 235 (in the "
            "success reply, RFC 4954's additional data with success)",
            GENERAL, metavar="REPLY", toml="scram_final", choices=("235", "334")),
    Setting("auth_timeout", ("--auth-timeout",),
            "time allowed for each authenticator (default 30)",
            LIMITS, float, "SECONDS", toml="auth_timeout"),
    Setting("sender_map", ("--sender-map",),
            "user -> allowed envelope senders; others get 553 5.7.1",
            LIMITS, metavar="FILE", toml="sender_map"),
    Setting("ratelimit", ("--ratelimit",),
            "where failed logins are counted, per client and per user (default sqlite, in "
            "--state-dir; memory: one daemon only); off turns guessing limits off",
            LIMITS, metavar="sqlite|memory|redis://HOST:PORT/DB|off", toml="ratelimit",
            toml_type=(str, dict)),  # a [ratelimit] table: _take_ratelimit_table
    Setting("ratelimit_fail_open", ("--ratelimit-fail-closed",),
            "refuse logins while the rate-limit store cannot be used (default: fall back to a "
            "limit in process memory)",
            LIMITS, bool, toml="ratelimit_fail_open", const=False),
    Setting("quota", ("--quota",),
            "a sending quota, repeatable: KIND user-messages, user-recipients, ip-messages or "
            "ip-recipients, WINDOW like 30s, 10m, 1h, 1d (e.g. user-messages:200/1h)",
            LIMITS, metavar="KIND:LIMIT/WINDOW", toml="quota", toml_type=list, repeat=True,
            from_flag=_quota_flag, from_toml=_quota_tables),
    Setting("quota_reply", ("--quota-reply",),
            "over quota: temporary (450 4.7.1 at MAIL, 452 4.5.3 at RCPT; the default) or "
            "permanent (550 5.7.1)", LIMITS, toml="quota_reply",
            choices=("temporary", "permanent")),
    Setting("state_dir", ("--state-dir",),
            "directory for the sqlite rate-limit store, made 0700 for the -u user (default "
            "$STATE_DIRECTORY, else /var/lib/ofmipd)",
            LIMITS, metavar="DIR", toml="state_dir"),
    Setting("bare_newline", ("--bare-newline",),
            "a bare LF or CR in a message: take it as a line ending (normalize, the default) "
            "or refuse the message with 550 5.5.2",
            LIMITS, toml="bare_newline", choices=("normalize", "reject")),
    Setting("check_header_from", ("--check-header-from",),
            "refuse (550 5.7.1) a message whose header From or Sender is not an address "
            "--sender-map allows the login", LIMITS, bool, toml="check_header_from"),
    Setting("metrics", ("--metrics",), "serve Prometheus metrics here", LIMITS,
            metavar="HOST:PORT", toml="metrics"),
    Setting("reverse_dns", ("--no-reverse-dns",),
            "do not look up client names for the Received header",
            LIMITS, bool, toml="reverse_dns", const=False),
    Setting("policy", ("--policy",),
            "ask this Postfix policy server at RCPT and end of message (repeatable, asked in "
            "order; the first answer other than DUNNO decides)", LIMITS,
            metavar="inet:HOST:PORT|unix:PATH", toml="policy", toml_type=(list, str),
            repeat=True, from_flag=_policy_spec, from_toml=_policy_specs),
    Setting("policy_timeout", ("--policy-timeout",),
            "time allowed for each policy answer (default 10)",
            LIMITS, float, "SECONDS", toml="policy_timeout"),
    Setting("policy_default_action", ("--policy-default-action",),
            "the reply when a policy server is down, slow or answers nonsense (default "
            "'451 4.3.5 Server configuration problem'; DUNNO fails open)",
            LIMITS, metavar="ACTION", toml="policy_default_action"),
)  # fmt: skip


def merge(base: Config, flags: dict[str, Any]) -> Config:
    """Flags that were given replace the file's values (auth flags replace the whole chain)."""
    known = set(Config._fields)
    given = {k: v for k, v in flags.items() if k in known and v is not None and v != ()}
    return base._replace(**given)


def validate(config: Config) -> Config:
    if not config.auth:
        raise ConfigError(
            "no authenticator configured: give at least one of -a FILE, --htpasswd FILE, "
            "-A PROGRAM, -m SERVICE, -R URL (or [[auth]] in --config)"
        )
    _check_choices(config)
    if config.ssl and config.tls:
        raise ConfigError("--ssl and --tls exclude each other (implicit TLS has no STARTTLS)")
    if (config.ssl or config.tls) and not config.ssl_cert:
        raise ConfigError("--ssl and --tls need --ssl-cert FILE")
    if config.sendmail and config.maildir:
        raise ConfigError("--sendmail and --maildir exclude each other: choose one delivery")
    if config.check_header_from and not config.sender_map:
        raise ConfigError("--check-header-from needs --sender-map FILE (who may use which From)")
    if config.relay_auth and config.relay_tls == "none":
        raise ConfigError("--relay-auth needs TLS: a password is never sent in clear")
    if config.relay and (config.sendmail or config.maildir):
        other = "--sendmail" if config.sendmail else "--maildir"
        raise ConfigError(f"--relay and {other} exclude each other: choose one delivery")
    _check_numbers(config)
    _check_processes(config)
    return config


def _check_choices(config: Config) -> None:
    """For TOML values: argparse already checked the flags'."""
    for setting in SETTINGS:
        if setting.choices and setting.field:
            value = getattr(config, setting.field)
            if value is not None and value not in setting.choices:
                choices = ", ".join(setting.choices)
                raise ConfigError(f"{setting.flags[-1]} {value!r}: must be one of {choices}")


def _check_numbers(config: Config) -> None:
    if config.connections < 1:
        raise ConfigError(f"--connections {config.connections}: must be a positive integer")
    for name in ("max_recipients", "max_errors", "max_commands", "max_per_ip"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise ConfigError(f"{name} {getattr(config, name)}: must be a positive integer")
    for name in (
        "idle_timeout",
        "ehlo_timeout",
        "data_timeout",
        "delivery_timeout",
        "auth_timeout",
    ):
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} {getattr(config, name)}: must be positive")
    if not 1 <= config.workers <= 64:
        raise ConfigError(f"--workers {config.workers}: must be 1 to 64")
    if config.relay_connections < 1:
        raise ConfigError(f"--relay-connections {config.relay_connections}: must be positive")
    if config.size_limit < 1024:
        raise ConfigError(f"size_limit {config.size_limit}: too small")


def _check_processes(config: Config) -> None:
    """What works only with one process, or only with a daemon."""
    if config.workers > 1 and config.metrics:
        raise ConfigError("--metrics works with one worker only (each would bind the port)")
    if config.one_session and config.metrics:
        raise ConfigError("--metrics needs daemon mode: a one-session process lives too briefly")
    if config.metrics:
        from ofmipd.metrics import parse_address

        parse_address(config.metrics)  # --check-config and a reload see a bad address too
    if config.ratelimit == "memory" and (config.one_session or config.workers > 1):
        raise ConfigError(
            "--ratelimit memory is one process's memory: "
            + ("a one-session process forgets it when it ends" if config.one_session
               else "each worker would count apart")
            + "; leave the default (sqlite in the state directory) or use redis://HOST:PORT/DB"
        )  # fmt: skip


__all__ = ["BackendSpec", "Config", "ConfigError", "Listen"]
