"""Configuration as immutable records (NamedTuples), from TOML merged with command-line flags.

Flags win over the file. Backends keep the order they were given in. Every
problem becomes one ConfigError line; ofmipd prints it and exits 2.
"""

# No `from __future__ import annotations` here: typing.NamedTuple would compile each of
# Config's 39 string annotations at import (~0.5 ms), which every `ofmipd -1` pays.
import os
from typing import Any, NamedTuple

from auth_backends import BackendSpec, kind_for_url
from ofmipd.errors import ConfigError

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
    sendmail: str | None = None
    maildir: str | None = None
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
    state_dir: str | None = None  # None: $STATE_DIRECTORY, else /var/lib/ofmipd
    metrics: str | None = None  # HOST:PORT of a Prometheus endpoint
    reverse_dns: bool = True
    bare_newline: str = "normalize"  # a bare LF or CR in DATA: "normalize" or "reject"
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


def backend_from_flag(flag: str, value: str) -> BackendSpec:
    kind = {
        "authfile": "authfile",
        "htpasswd": "htpasswd",
        "authprog": "checkpassword",
        "pamauth": "pam",
    }.get(flag)
    if flag == "remoteauth":
        kind = kind_for_url(value)
    if kind is None:
        raise ConfigError(f"unknown authentication option --{flag}")
    return BackendSpec(kind=kind, arg=value)


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
        raise ConfigError(f"{where}: {key} must be {getattr(kind, '__name__', kind)}")
    return value


def from_mapping(data: dict[str, Any], *, source: str) -> Config:
    """Turn a parsed TOML document into a Config; unknown keys are errors, not silence."""
    data = dict(data)
    values: dict[str, Any] = {"source": source}
    listen = _take(data, "listen", (list, str), source)
    if listen is not None:
        values["listen"] = tuple(
            parse_listen(x) for x in ([listen] if isinstance(listen, str) else listen)
        )
    simple: dict[str, type | tuple[type, ...]] = {
        "one_session": bool,
        "connections": int,
        "workers": int,
        "background": bool,
        "user": str,
        "hostname": str,
        "auth_timeout": (int, float),
        "rules": str,
        "size_limit": int,
        "idle_timeout": (int, float),
        "ehlo_timeout": (int, float),
        "max_recipients": int,
        "data_timeout": (int, float),
        "max_errors": int,
        "max_commands": int,
        "max_per_ip": int,
        "sender_map": str,
        "ratelimit_fail_open": bool,
        "state_dir": str,
        "metrics": str,
        "reverse_dns": bool,
        "bare_newline": str,
    }
    for key, expected in simple.items():
        value = _take(data, key, expected, source)
        if value is not None:
            values["username" if key == "user" else key] = value
    ratelimit = _take(data, "ratelimit", (str, dict), source)
    if isinstance(ratelimit, str):
        values["ratelimit"] = ratelimit
    elif isinstance(ratelimit, dict):  # [ratelimit] store = "redis://..." max_failures = 5 ...
        options = dict(ratelimit)
        store = options.pop("store", None)
        if store is not None:
            values["ratelimit"] = str(store)
        values["ratelimit_options"] = tuple(sorted(options.items()))
    tls_in_front = _take(data, "tls_in_front", (bool, str, list), source)
    if tls_in_front is not None:
        values["tls_in_front"] = tls_in_front_list(tls_in_front)
    rule_tables = _take(data, "rule", list, source)
    if rule_tables:
        values["rule_tables"] = tuple(rule_tables)
    proxies = _take(data, "proxy_protocol", (list, str), source)
    if proxies is not None:
        values["proxy_protocol"] = tuple([proxies] if isinstance(proxies, str) else proxies)
    tls = dict(_take(data, "tls", dict, source) or {})
    for key, name in (
        ("mode", "tls"),
        ("cert", "ssl_cert"),
        ("key", "ssl_key"),
        ("ciphers", "ciphers"),
    ):
        value = _take(tls, key, str, f"{source} [tls]")
        if value is not None:
            values[name] = value
    implicit = _take(tls, "implicit", bool, f"{source} [tls]")
    if implicit is not None:
        values["ssl"] = implicit
    _no_leftovers(tls, f"{source} [tls]")
    delivery = dict(_take(data, "delivery", dict, source) or {})
    for key, expected_type in (
        ("sendmail", str),
        ("maildir", str),
        ("throttle_script", str),
        ("timeout", (int, float)),
    ):
        value = _take(delivery, key, expected_type, f"{source} [delivery]")
        if value is not None:
            values["delivery_timeout" if key == "timeout" else key] = value
    _no_leftovers(delivery, f"{source} [delivery]")
    logging_table = dict(_take(data, "log", dict, source) or {})
    for key in ("debug", "syslog"):
        value = _take(logging_table, key, bool, f"{source} [log]")
        if value is not None:
            values[key] = value
    _no_leftovers(logging_table, f"{source} [log]")
    auth = _take(data, "auth", list, source) or []
    specs = []
    for number, table in enumerate(auth, 1):
        if not isinstance(table, dict) or "kind" not in table:
            raise ConfigError(f'{source}: [[auth]] entry {number} needs kind = "..."')
        options = dict(table)
        kind = str(options.pop("kind"))
        specs.append(BackendSpec(kind=kind, options=options))
    if specs:
        values["auth"] = tuple(specs)
    _no_leftovers(data, source)
    return Config(**values)


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
    if config.tls is not None and config.tls not in TLS_MODES:
        raise ConfigError(f"--tls {config.tls!r}: must be one of {', '.join(TLS_MODES)}")
    if config.ssl and config.tls:
        raise ConfigError("--ssl and --tls exclude each other (implicit TLS has no STARTTLS)")
    if (config.ssl or config.tls) and not config.ssl_cert:
        raise ConfigError("--ssl and --tls need --ssl-cert FILE")
    if config.connections < 1:
        raise ConfigError(f"--connections {config.connections}: must be a positive integer")
    if config.sendmail and config.maildir:
        raise ConfigError("--sendmail and --maildir exclude each other: choose one delivery")
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
    if config.workers > 1 and config.metrics:
        raise ConfigError("--metrics works with one worker only (each would bind the port)")
    if config.one_session and config.metrics:
        raise ConfigError("--metrics needs daemon mode: a one-session process lives too briefly")
    if config.metrics:
        from ofmipd.metrics import parse_address

        parse_address(config.metrics)  # --check-config and a reload see a bad address too
    if config.bare_newline not in ("normalize", "reject"):
        raise ConfigError(f"bare_newline {config.bare_newline!r}: must be normalize or reject")
    if config.ratelimit == "memory" and (config.one_session or config.workers > 1):
        raise ConfigError(
            "--ratelimit memory is one process's memory: "
            + ("a one-session process forgets it when it ends" if config.one_session
               else "each worker would count apart")
            + "; leave the default (sqlite in the state directory) or use redis://HOST:PORT/DB"
        )  # fmt: skip
    if config.size_limit < 1024:
        raise ConfigError(f"size_limit {config.size_limit}: too small")
    return config


__all__ = ["Config", "ConfigError", "Listen"]
