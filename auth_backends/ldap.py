"""LDAP authenticator: a simple bind as a DN template, or search-then-bind, via python-ldap.

Two ways to find the DN to bind as:
- DN template (tmda-ofmipd `-R ldap://HOST[:PORT]/uid=%s,ou=people,dc=example,dc=org`):
  the user name, DN-escaped, replaces every `%s`.
- search-then-bind (TOML): a service account (or anonymous) searches `base` with `filter`
  (the user name filter-escaped); exactly one entry must match, and its DN is bound with the
  user's password on a separate, short-lived connection. Service connections are pooled and
  replaced when their server went away. A user the search does not find costs a bind too
  (as a DN that cannot exist), so timing does not tell who exists.

An accepted login returns the entry's own name, not the one typed: the directory's matching
rules fold case and compatibility forms ("ＡＬＩＣＥ" binds as uid=alice), and the session
must be alice for the sender map, LOGIN and the logs. That name is the `user_attribute`
(default: the attribute of the template's RDN that holds %s, or the first one the search
filter compares with %s) of the entry bound as: requested with the search, or read after
the bind. An entry whose name cannot be read is a setup problem (TEMPFAIL), never the
typed name.

python-ldap blocks, so every call runs in this backend's Offload pool. Several URIs give
failover: an outage or timeout at one server moves on to the next.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar
from urllib.parse import unquote

import ldap  # python-ldap
import ldap.dn
import ldap.filter

from auth_backends.kinds import LDAP as BACKEND
from ofmipd.auth import Outcome, Secret, Verdict, accept, reject, tempfail
from ofmipd.config import BackendSpec
from ofmipd.errors import ConfigError
from ofmipd.identity import ClientIdentity
from ofmipd.logs import printable, redact_url
from ofmipd.offload import Offload
from ofmipd.secretfile import warn_if_shared
from ofmipd.urls import split_url

if TYPE_CHECKING:
    from auth_backends.kinds import Settings as Options

log = logging.getLogger("ofmipd.ldap")
T = TypeVar("T")

# RFC 4511 §4.1.9 result names; negative codes are libldap's client-side errors.
RESULT_NAMES = {
    1: "operationsError", 2: "protocolError", 3: "timeLimitExceeded", 4: "sizeLimitExceeded",
    7: "authMethodNotSupported", 8: "strongerAuthRequired", 10: "referral",
    11: "adminLimitExceeded", 12: "unavailableCriticalExtension", 13: "confidentialityRequired",
    32: "noSuchObject", 34: "invalidDNSyntax", 48: "inappropriateAuthentication",
    49: "invalidCredentials", 50: "insufficientAccessRights", 51: "busy", 52: "unavailable",
    53: "unwillingToPerform", 54: "loopDetect", 80: "other",
    -1: "serverDown", -2: "localError", -3: "encodingError", -4: "decodingError", -5: "timeout",
    -6: "authUnknown", -7: "filterError", -9: "paramError", -10: "noMemory", -11: "connectError",
    -12: "notSupported",
}  # fmt: skip
# The server's answer about this user. invalidDNSyntax can only come from the user name:
# the template itself is parsed at start-up. Everything else is an outage or a setup
# problem, and the client must hear "try later" because the directory might have said yes.
REJECTING = frozenset({"invalidCredentials", "noSuchObject", "invalidDNSyntax"})
# A pooled connection failing like this has lost its server (restart, idle timeout).
BROKEN = (ldap.SERVER_DOWN, ldap.CONNECT_ERROR)
SCOPES = {"base": ldap.SCOPE_BASE, "one": ldap.SCOPE_ONELEVEL, "sub": ldap.SCOPE_SUBTREE}
DEFAULT_FILTER = "(uid=%s)"
_ATTRIBUTE = re.compile(r"(?:[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)+)\Z")
# "(attr=...%s...)", also with options, ~= >= <=, or an extensible match "(attr:rule:=%s)".
_COMPARED = re.compile(r"\(\s*([A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)+)[^=()]*=[^()]*%s")


class ServiceRefused(ldap.LDAPError):
    """The service account's own bind was refused: our setup, never the user's password."""


def result_name(error: ldap.LDAPError) -> str:
    if isinstance(error, ServiceRefused):
        return str(error.args[0])
    details = error.args[0] if error.args and isinstance(error.args[0], dict) else {}
    code = details.get("result")
    if isinstance(code, int) and code in RESULT_NAMES:
        return RESULT_NAMES[code]
    # TIMEOUT carries no details; make INVALID_CREDENTIALS-style class names camelCase.
    head, *rest = type(error).__name__.lower().split("_")
    return head + "".join(word.capitalize() for word in rest)


class Answer(Exception):
    """Stop here with this outcome (a definitive REJECT, or TEMPFAIL after every server)."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.reason)
        self.outcome = outcome


class Settings(NamedTuple):
    uris: tuple[str, ...]
    dn_template: str | None = None  # set: direct bind; None: search-then-bind
    bind_dn: str | None = None  # the service account; None searches anonymously
    bind_password: str = ""
    base: str = ""
    scope: str = "sub"
    filter: str = DEFAULT_FILTER
    starttls: bool = False
    ca_file: str | None = None
    network_timeout: float = 5.0
    timeout: float = 10.0
    workers: int = 4
    user_attribute: str = "uid"  # holds the canonical user name


class LdapAuth:
    name = "ldap"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        servers = " ".join(settings.uris)
        if settings.dn_template is not None:
            self.target = f"{servers} {settings.dn_template}"
        else:
            self.target = f"{servers} {settings.scope} {settings.base} {settings.filter}"
        self.offload = Offload("ldap", workers=settings.workers, max_queue_age=settings.timeout)
        self._pool: dict[str, list[Any]] = {uri: [] for uri in settings.uris}
        self._lock = threading.Lock()
        self._preferred = settings.uris[0]  # the last server that answered
        # Bound for unknown users; random, so no entry can have it.
        self._nobody = f"cn=ofmipd-no-such-user-{secrets.token_hex(8)},{settings.base}"

    async def verify(self, user: str, secret: Secret, client: ClientIdentity) -> Outcome:
        password = secret.reveal()
        if not password:
            # RFC 4513 §5.1.2: a DN with an empty password is an unauthenticated bind,
            # which many servers answer with success.
            return reject("empty password refused (RFC 4513 unauthenticated bind)")
        return await self.offload.run(self._verify, user, password)

    def _verify(self, user: str, password: bytes) -> Outcome:
        """Blocking: find the DN, bind as it, learn the entry's name."""
        try:
            if self.settings.dn_template is not None:
                typed_dn = self.settings.dn_template.replace("%s", ldap.dn.escape_dn_chars(user))
                dn, name = self._on_any_server(
                    lambda uri: self._bind_as(uri, typed_dn, password, read_name=True)
                )
            else:
                dn, name = self._found(user, password)
                self._on_any_server(lambda uri: self._bind_as(uri, dn, password))
            if name is None:
                raise Answer(tempfail(f"LDAP bind as {dn}, but {self._unnamed(dn)}"))
        except Answer as answer:
            return answer.outcome
        return accept(f"LDAP bind as {dn}", name)

    def _unnamed(self, dn: str) -> str:
        attribute = self.settings.user_attribute
        log.warning(
            "LDAP entry %s has no single %s value to name the session by", printable(dn), attribute
        )
        return f"the entry has no single {attribute} value (user_attribute)"

    def _found(self, user: str, password: bytes) -> tuple[str, str | None]:
        """(DN, canonical name) of the one entry the search finds for `user`."""
        try:
            return self._on_any_server(lambda uri: self._find(uri, user))
        except Answer as answer:
            if answer.outcome.verdict is Verdict.REJECT:
                # Found nobody (or too many): spend the bind a known user costs.
                try:
                    self._bind_as(self._preferred, self._nobody, password)
                except ldap.LDAPError:
                    pass
            raise

    def _servers(self) -> list[str]:
        # Start with the server that answered last, so a dead first server costs its
        # network timeout once, not on every login.
        uris = list(self.settings.uris)
        first = uris.index(self._preferred)
        return uris[first:] + uris[:first]

    def _on_any_server(self, work: Callable[[str], T]) -> T:
        failures = []
        for uri in self._servers():
            try:
                result = work(uri)
            except ldap.LDAPError as error:
                name = result_name(error)
                if name in REJECTING:
                    raise Answer(reject(f"LDAP {name}")) from None
                log.warning("LDAP %s at %s", name, uri)
                failures.append(f"LDAP {name} at {uri}")
                continue
            self._preferred = uri
            return result
        raise Answer(tempfail("; ".join(failures)))

    def _connect(self, uri: str) -> Any:
        """A new connection with timeouts and TLS set; TCP connects on first use."""
        s = self.settings
        conn = ldap.initialize(uri)
        conn.set_option(ldap.OPT_PROTOCOL_VERSION, ldap.VERSION3)
        conn.set_option(ldap.OPT_REFERRALS, 0)  # never bind our password at a referred host
        conn.set_option(ldap.OPT_NETWORK_TIMEOUT, s.network_timeout)  # TCP connect
        conn.set_option(ldap.OPT_TIMEOUT, s.timeout)  # each synchronous operation
        conn.timeout = s.timeout  # python-ldap's own wait in the *_s methods
        if s.starttls or uri.lower().startswith("ldaps:"):
            conn.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, ldap.OPT_X_TLS_DEMAND)
            if s.ca_file:
                conn.set_option(ldap.OPT_X_TLS_CACERTFILE, s.ca_file)
            conn.set_option(ldap.OPT_X_TLS_NEWCTX, 0)  # per-connection TLS context, set last
        if s.starttls:
            try:
                conn.start_tls_s()
            except ldap.LDAPError:
                _close(conn)
                raise
        return conn

    def _bind_as(
        self, uri: str, dn: str, password: bytes, read_name: bool = False
    ) -> tuple[str, str | None]:
        """Bind as `dn`; with read_name, read the entry as itself: (its DN, its name)."""
        # A fresh connection per user bind: a pooled one would change identity under
        # whoever uses it next, and a failed bind must not leave state behind.
        conn = self._connect(uri)
        try:
            conn.simple_bind_s(dn, password)
            if not read_name:
                return dn, None
            attribute = self.settings.user_attribute
            try:
                found = conn.search_ext_s(
                    dn,
                    ldap.SCOPE_BASE,
                    "(objectClass=*)",
                    [attribute],
                    timeout=self.settings.timeout,
                )
            except ldap.LDAPError as error:
                if isinstance(error, BROKEN):
                    raise  # the server went away: try the next one
                # Bound, but may not read its own entry: an ACL to fix, not a wrong password.
                raise Answer(
                    tempfail(
                        f"LDAP bind as {dn}, but reading its {attribute}: {result_name(error)}"
                    )
                ) from None
            entries = [(entry_dn, attrs) for entry_dn, attrs in found if entry_dn is not None]
            if len(entries) != 1:
                return dn, None
            entry_dn, attrs = entries[0]
            return entry_dn, canonical_name(attribute, entry_dn, attrs)
        finally:
            _close(conn)

    def _find(self, uri: str, user: str) -> tuple[str, str | None]:
        """(DN, name) of the one entry the search finds for `user`, via a pooled
        service connection."""
        s = self.settings
        query = s.filter.replace("%s", ldap.filter.escape_filter_chars(user))
        conn, reused = self._service_connection(uri)
        try:
            found = self._search(conn, query)
        except BROKEN:
            if not reused:
                raise
            # The server restarted or dropped the idle connection: one fresh try.
            conn, _ = self._service_connection(uri, fresh=True)
            found = self._search(conn, query)
        with self._lock:
            self._pool[uri].append(conn)
        if not found:
            raise Answer(reject("LDAP search found no such user"))
        if len(found) > 1:
            raise Answer(reject("LDAP search ambiguous: more than one entry matches"))
        dn, attrs = found[0]
        return dn, canonical_name(s.user_attribute, dn, attrs)

    def _search(self, conn: Any, query: str) -> list[tuple[str, dict[str, list[bytes]]]]:
        s = self.settings
        try:
            # sizelimit 1: a second match is all we need to know to refuse.
            results = conn.search_ext_s(
                s.base, SCOPES[s.scope], query, [s.user_attribute], timeout=s.timeout, sizelimit=1
            )
        except ldap.SIZELIMIT_EXCEEDED:
            return [("", {}), ("", {})]
        except ldap.LDAPError:
            _close(conn)  # after a timeout its state is unknown
            raise
        return [(dn, attrs) for dn, attrs in results if dn is not None]  # skip references

    def _service_connection(self, uri: str, fresh: bool = False) -> tuple[Any, bool]:
        """A bound service connection: (connection, whether it was reused from the pool)."""
        if not fresh:
            with self._lock:
                if self._pool[uri]:
                    return self._pool[uri].pop(), True
        s = self.settings
        conn = self._connect(uri)
        try:
            if s.bind_dn is not None:
                conn.simple_bind_s(s.bind_dn, s.bind_password)
        except ldap.LDAPError as error:
            _close(conn)
            name = result_name(error)
            if name in REJECTING:
                raise ServiceRefused(f"{name} for the service account {s.bind_dn}") from None
            raise
        return conn, False

    async def close(self) -> None:
        with self._lock:
            connections = [conn for pool in self._pool.values() for conn in pool]
            for pool in self._pool.values():
                pool.clear()
        for conn in connections:
            _close(conn)
        self.offload.close()


def canonical_name(attribute: str, dn: str, attrs: Mapping[str, list[bytes]]) -> str | None:
    """The entry's name: its only `attribute` value, else the one in its RDN; None if
    neither says (no value, several and none in the RDN, not UTF-8)."""
    wanted = attribute.lower()
    values = [value for key, found in attrs.items() if key.lower() == wanted for value in found]
    if len(values) == 1:
        try:
            return values[0].decode("utf-8")
        except UnicodeDecodeError:
            return None
    try:
        rdn = ldap.dn.str2dn(dn)[0] if dn else []
    except ldap.DECODING_ERROR:
        return None
    named = [value for key, value, _ in rdn if key.lower() == wanted]
    return named[0] if len(named) == 1 and isinstance(named[0], str) else None


def _close(conn: Any) -> None:
    try:
        conn.unbind_ext_s()
    except ldap.LDAPError:
        pass


# ---- configuration ----


def create(spec: BackendSpec) -> LdapAuth:
    settings = BACKEND.settings(spec)
    if spec.arg is not None:
        if "uri" in settings or "dn_template" in settings:
            raise settings.error("the URL already gives the server and DN template")
        uri, template = _split_flag_url(spec.arg, settings.where)
        settings.given.update(uri=uri, dn_template=template)
    return LdapAuth(_settings(settings))


def _split_flag_url(url: str, where: str) -> tuple[str, str]:
    """ldap://HOST[:PORT]/DN-TEMPLATE -> ("ldap://HOST[:PORT]", template), URL-decoded."""
    parts = split_url(url, where)
    if parts.query or parts.fragment or "?" in url:
        raise ConfigError(f"{where}: LDAP URL query parts are not supported; write /DN-TEMPLATE")
    server = f"{parts.scheme}://{parts.netloc}"
    _check_uri(server, where)
    return server, unquote(parts.path[1:])


def _check_uri(uri: str, where: str) -> None:
    parts = split_url(uri, where)  # brackets and port
    shown = redact_url(uri)
    if parts.scheme.lower() not in ("ldap", "ldaps"):
        raise ConfigError(f"{where}: {shown!r} is not an ldap:// or ldaps:// URL")
    if "@" in parts.netloc:
        # LDAP URLs (RFC 4516) have no user part; a password there would be shown in
        # --check-config and logs. The service account is bind_dn and bind_password_file.
        raise ConfigError(f"{where}: {shown!r}: no user or password in an LDAP URL; use bind_dn")
    if not parts.hostname:
        raise ConfigError(f"{where}: {shown!r} names no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{where}: {shown!r}: give the DN as dn_template, not in the URL")


def _settings(options: Options) -> Settings:
    """The declaration checked names and types; here, what each value must mean."""
    uris = _uris(options)
    template = _bind_target(options)
    query = _filter(options)
    bind_dn, bind_password = _service_account(options)
    starttls = _tls(options, uris)
    attribute = options["user_attribute"] or _named_by(template, query, options.where)
    if not _ATTRIBUTE.match(attribute):
        raise options.error(f"user_attribute {attribute!r} is not an attribute name")
    return Settings(
        uris=uris,
        dn_template=template,
        bind_dn=bind_dn,
        bind_password=bind_password,
        base=options["base"] or "",
        scope=options["scope"],
        filter=query,
        starttls=starttls,
        ca_file=options["ca_file"],
        network_timeout=options["network_timeout"],
        timeout=options["timeout"],
        workers=options["workers"],
        user_attribute=attribute,
    )


def _uris(options: Options) -> tuple[str, ...]:
    raw_uris = options["uri"]
    uris: Sequence[Any] = [raw_uris] if isinstance(raw_uris, str) else raw_uris or []
    if not uris or not isinstance(uris, list | tuple) or not all(isinstance(u, str) for u in uris):
        raise options.error('uri must be "ldap://HOST[:PORT]" or a list of them')
    for uri in uris:
        _check_uri(uri, options.where)
    unique = tuple(u.rstrip("/") for u in uris)
    if len(set(unique)) != len(unique):
        raise options.error("uri lists a server twice")
    return unique


def _bind_target(options: Options) -> str | None:
    """The DN template, or None for search-then-bind under `base`."""
    template, base = options["dn_template"], options["base"]
    if (template is None) == (base is None):
        raise options.error("give either dn_template or base (search-then-bind)")
    if template is None:
        _check_dn(base, f"{options.where}: base {base!r}")
        return None
    for key in ("bind_dn", "bind_password_file", "scope", "filter"):
        if key in options:
            raise options.error(f"{key} is for search-then-bind, not dn_template")
    if "%s" not in template:
        raise options.error(f"DN template {template!r} has no %s for the user name")
    _check_dn(template.replace("%s", "user"), f"{options.where}: DN template {template!r}")
    return str(template)


def _filter(options: Options) -> str:
    if options["scope"] not in SCOPES:
        raise options.error('scope must be "sub", "one" or "base"')
    query = str(options["filter"])
    if "%s" not in query:
        raise options.error(f"filter {query!r} has no %s for the user name")
    if not _balanced(query):
        raise options.error(f"filter {query!r} is not a parenthesised LDAP filter")
    return query


def _service_account(options: Options) -> tuple[str | None, str]:
    """(bind_dn, its password) for the search; (None, "") searches anonymously."""
    bind_dn, password_file = options["bind_dn"], options["bind_password_file"]
    if (bind_dn is None) != (password_file is None):
        raise options.error("bind_dn and bind_password_file go together")
    if bind_dn is None:
        return None, ""
    where = options.where
    _check_dn(bind_dn, f"{where}: bind_dn {bind_dn!r}")
    try:
        with open(password_file, encoding="utf-8") as f:
            warn_if_shared(os.fstat(f.fileno()), password_file, f"{where}: bind_password_file")
            bind_password = f.read().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as error:
        raise options.error(f"bind_password_file {password_file}: {error}") from None
    if not bind_password:
        # Empty would be an unauthenticated bind (RFC 4513 §5.1.2), not a service login.
        raise options.error(f"bind_password_file {password_file} is empty")
    return str(bind_dn), bind_password


def _tls(options: Options, uris: tuple[str, ...]) -> bool:
    starttls: bool = options["starttls"]
    ldaps = any(u.lower().startswith("ldaps:") for u in uris)
    if starttls and ldaps:
        raise options.error("starttls with ldaps:// would start TLS twice")
    ca_file = options["ca_file"]
    if ca_file is not None:
        if not starttls and not ldaps:
            raise options.error("ca_file needs starttls = true or an ldaps:// uri")
        if not os.path.isfile(ca_file) or not os.access(ca_file, os.R_OK):
            raise options.error(f"ca_file {ca_file} is not a readable file")
    return starttls


def _named_by(template: str | None, query: str, where: str) -> str:
    """The attribute that names a user: the template's RDN holding %s, or the first
    attribute the filter compares with %s."""
    if template is not None:
        marker = "ofmipdUserName"
        for rdn in ldap.dn.str2dn(template.replace("%s", marker)):
            for attribute, value, _ in rdn:
                if marker in value:
                    return str(attribute)
        raise ConfigError(f"{where}: DN template {template!r}: set user_attribute")
    compared = _COMPARED.search(query)
    if compared is None:
        raise ConfigError(f"{where}: filter {query!r}: set user_attribute (the name attribute)")
    return compared.group(1)


def _check_dn(dn: str, what: str) -> None:
    try:
        ldap.dn.str2dn(dn)
    except ldap.DECODING_ERROR:
        raise ConfigError(f"{what} is not a valid DN") from None


def _balanced(query: str) -> bool:
    if not (query.startswith("(") and query.endswith(")")):
        return False
    depth = 0
    escaped = False
    for char in query:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0
