"""passwd-file authenticator: Dovecot's user file, with app passwords.

Each line is `user:{SCHEME}hash[:uid:gid:gecos:home:shell:extra_fields]`, as Dovecot's
passwd-file driver reads it and `doveadm pw -s SCHEME` writes the hash. The extra fields
are `key=value` words (shell quoting allowed, so `reason="on leave"` works); those this
store does not know are Dovecot's business and are ignored.

A user may have several lines: at most one without `label=` (the main password) and any
number of app passwords, each with a unique `label=` and its own scope (`allow_nets=`,
`expires=YYYY-MM-DD`, `mechanisms=`). Any line whose hash matches and whose scope allows
this client accepts; the Outcome names the label, never the password. `nologin` on any of
the user's lines turns the whole account off (app passwords too).

SCRAM: `{SCRAM-*}` lines hand over their keys, `{PLAIN}` lines derive them (one salt per
user); one-way hashes cannot serve SCRAM. Each key carries the reason its line's scope
refuses this client, judged as for PLAIN, so a right proof out of scope is refused with
that reason (see auth.scram_candidates for which lines one exchange can check).

The file is the admin's, so a line we cannot read is refused with its number, rather
than skipped: a skipped line could be someone's only way in, or the line that disabled
them. The whole file is then unusable (TEMPFAIL, or no start-up) until it is fixed.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import hmac
import logging
import os
import stat
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from passlib.registry import get_crypt_handler

from auth_backends.htpasswd import BCRYPT_MAX, Entry, Kind, costliest, describe, spend
from auth_backends.kinds import PASSWD_FILE as BACKEND
from auth_backends.watched_file import Unavailable, WatchedFile
from ofmipd.auth import (
    Outcome,
    ScramKeys,
    Secret,
    accept,
    malformed_name,
    reject,
    tempfail,
)
from ofmipd.config import BackendSpec
from ofmipd.errors import ConfigError
from ofmipd.identity import ClientIdentity, Networks
from ofmipd.offload import Offload

if TYPE_CHECKING:
    from ofmipd.store import Store

log = logging.getLogger("ofmipd.passwd_file")

ALLOWED_MODES = (0o600, 0o640)  # hashes (and maybe {PLAIN}): owner, perhaps a group
# The password mechanisms: what verify() serves. SCRAM goes through scram_keys().
PASSWORD_MECHANISMS = frozenset({"PLAIN", "LOGIN"})
MECHANISMS = PASSWORD_MECHANISMS | {
    "CRAM-MD5",
    "SCRAM-SHA-1",
    "SCRAM-SHA-1-PLUS",
    "SCRAM-SHA-256",
    "SCRAM-SHA-256-PLUS",
}
SCRAM_ITERATIONS = 4096  # keys derived from a {PLAIN} line: doveadm pw's default
LAST_USE_SECONDS = 400 * 86400  # forgotten after a year and a bit without use


def last_use_key(user: str, label: str) -> str:
    return f"passwd-file:last-use:{user}:{label}"


def derive(password: bytes, salt: bytes, iterations: int, digest: str) -> tuple[bytes, bytes]:
    """RFC 5802 StoredKey and ServerKey of a password."""
    salted = hashlib.pbkdf2_hmac(digest, password, salt, iterations)
    client_key = hmac.new(salted, b"Client Key", digest).digest()
    server_key = hmac.new(salted, b"Server Key", digest).digest()
    return hashlib.new(digest, client_key).digest(), server_key


class ScramScheme:
    """Dovecot's {SCRAM-SHA-*}ITERATIONS,SALT,STOREDKEY,SERVERKEY (base64), shaped like a
    libpass handler so htpasswd's cost and dummy helpers work on it."""

    __slots__ = ("digest", "name")

    def __init__(self, name: str, digest: str) -> None:
        self.name = name
        self.digest = digest

    def parse(self, text: str, label: str | None = None) -> ScramKeys:
        """Raises ValueError for anything but four fields of the right sizes."""
        fields = text.split(",")
        if len(fields) != 4 or not fields[0].isdigit():
            raise ValueError("not ITERATIONS,SALT,STOREDKEY,SERVERKEY")
        try:
            salt, stored, server = (base64.b64decode(f, validate=True) for f in fields[1:])
        except binascii.Error:
            raise ValueError("bad base64") from None
        size = hashlib.new(self.digest).digest_size
        if int(fields[0]) < 1 or not salt or len(stored) != size or len(server) != size:
            raise ValueError("wrong key sizes")
        return ScramKeys(salt, int(fields[0]), stored, server, label)

    def rounds(self, text: str) -> int:
        return self.parse(text).iterations

    def verify(self, password: bytes, text: str) -> bool:
        keys = self.parse(text)
        stored, _ = derive(password, keys.salt, keys.iterations, self.digest)
        return hmac.compare_digest(stored, keys.stored_key)


class PlainScheme:
    """{PLAIN} and {CLEAR}: the password itself."""

    name = "plain"

    @staticmethod
    def verify(password: bytes, text: str) -> bool:
        return hmac.compare_digest(password, text.encode("utf-8", "surrogateescape"))


SCRAM = {"SCRAM-SHA-256": ScramScheme("scram-sha-256", "sha256"),
         "SCRAM-SHA-1": ScramScheme("scram-sha-1", "sha1")}  # fmt: skip
# Dovecot's scheme -> libpass handler name, and a prefix libpass wants back on the hash.
LIBPASS = {
    "BLF-CRYPT": ("bcrypt", ""),
    "ARGON2ID": ("argon2", ""),
    "ARGON2I": ("argon2", ""),
    "SHA512-CRYPT": ("sha512_crypt", ""),
    "SHA256-CRYPT": ("sha256_crypt", ""),
    "SSHA512": ("ldap_salted_sha512", "{SSHA512}"),
}
SCHEMES = (*SCRAM, *LIBPASS, "PLAIN", "CLEAR")


class Line(NamedTuple):
    """One password of a user: the main one (label None) or an app password."""

    entry: Entry  # the hash as its handler takes it
    scheme: str  # as written: "SCRAM-SHA-256"
    number: int
    label: str | None
    nets: Networks | None
    expires: datetime.date | None
    mechanisms: frozenset[str] | None  # None: any

    def who(self, user: str) -> str:
        return f"app password {self.label!r} of {user}" if self.label else f"password of {user}"

    def refusal(self, user: str, client: ClientIdentity, served: frozenset[str]) -> str | None:
        """Why this line's scope does not let this client in, or None."""
        if self.nets is not None and not self.nets.contains(client.ip):
            where = client.ip or "an unknown address"
            return f"{self.who(user)} is not allowed from {where}: allow_nets={self.nets}"
        if self.expires is not None and self.expires < datetime.datetime.now(datetime.UTC).date():
            return f"{self.who(user)} expired on {self.expires.isoformat()}"
        if self.mechanisms is not None and not self.mechanisms & served:
            allowed, asked = ",".join(sorted(self.mechanisms)), "/".join(sorted(served))
            return f"{self.who(user)} is limited to mechanisms={allowed}, not {asked}"
        return None


class Account(NamedTuple):
    lines: list[Line]
    nologin: str | None  # None: may log in; else the reason ("" when none was given)


class Table(NamedTuple):
    users: dict[str, Account]
    dummy: Entry | None  # a line of the costliest scheme; None when the file has no users


class Malformed(ValueError):
    pass


def handler_for(scheme: str) -> tuple[Any, str]:
    """(handler, prefix libpass wants) for a Dovecot scheme name; Malformed if unknown."""
    if scheme in SCRAM:
        return SCRAM[scheme], ""
    if scheme in ("PLAIN", "CLEAR"):
        return PlainScheme, ""
    if scheme in LIBPASS:
        name, prefix = LIBPASS[scheme]
        return get_crypt_handler(name), prefix
    raise Malformed(f"unknown scheme {{{scheme}}}; known: {', '.join(SCHEMES)}")


def rounds_of(handler: Any, text: str) -> int | None:
    if isinstance(handler, ScramScheme):
        return handler.rounds(text)
    if handler is PlainScheme:
        return None
    return getattr(handler.from_string(text), "rounds", None)  # ValueError, TypeError


def parse_extra(text: str) -> dict[str, str]:
    """Dovecot's extra fields: `key=value` words, `key` alone meaning "yes"."""
    import shlex  # only when a file is (re)loaded

    try:
        words = shlex.split(text)
    except ValueError as error:
        raise Malformed(f"extra fields: {error}") from None
    fields: dict[str, str] = {}
    for word in words:
        key, _, value = word.partition("=")
        fields[key.lower()] = value
    return fields


def parse_line(text: str, number: int) -> tuple[str, Line, str | None]:
    """(user, line, nologin reason or None); Malformed says why not."""
    fields = text.split(":", 7)  # extra fields may hold colons (IPv6 allow_nets)
    user = fields[0]
    if len(fields) < 2:
        raise Malformed("not user:{SCHEME}hash")
    why = malformed_name(user)
    if why:
        raise Malformed(why)
    scheme, brace, hash_text = fields[1].partition("}")
    if not scheme.startswith("{") or not brace:
        raise Malformed("the password has no {SCHEME} prefix")
    scheme = scheme[1:].upper()
    handler, prefix = handler_for(scheme)
    hash_text = prefix + hash_text
    try:
        rounds_of(handler, hash_text)
    except (ValueError, TypeError):
        # Not libpass's words: they may quote part of the hash.
        raise Malformed(f"the hash is not a valid {{{scheme}}} hash") from None
    if handler is PlainScheme and not hash_text:
        raise Malformed("empty password")
    extra = parse_extra(fields[7]) if len(fields) == 8 else {}
    line = Line(
        Entry(hash_text, handler),
        scheme,
        number,
        extra.get("label") or None,
        Networks.parse(extra["allow_nets"], "allow_nets") if "allow_nets" in extra else None,
        parse_date(extra["expires"]) if "expires" in extra else None,
        parse_mechanisms(extra["mechanisms"]) if "mechanisms" in extra else None,
    )
    nologin = extra.get("reason", "") if "nologin" in extra else None
    return user, line, nologin


def parse_date(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise Malformed(f"expires={text!r} is not YYYY-MM-DD") from None


def parse_mechanisms(text: str) -> frozenset[str]:
    names = frozenset(name.strip().upper() for name in text.split(",") if name.strip())
    unknown = sorted(names - MECHANISMS)
    if unknown or not names:
        raise Malformed(f"mechanisms={text!r}: unknown {', '.join(unknown) or '(none given)'}")
    return names


def parse(data: bytes, path: str) -> Table:
    users: dict[str, Account] = {}
    samples: dict[Kind, Entry] = {}
    for number, raw in enumerate(data.split(b"\n"), 1):
        line_text = raw.strip()
        if not line_text or line_text.startswith(b"#"):
            continue
        try:
            text = line_text.decode("utf-8")
            user, line, nologin = parse_line(text, number)
            account = users.setdefault(user, Account([], None))
            if any(old.label == line.label for old in account.lines):
                what = f"label {line.label!r}" if line.label else "a main password (no label=)"
                raise Malformed(f"{user} already has {what}")
        except UnicodeDecodeError:
            raise Unavailable(f"passwd-file {path} line {number}: not UTF-8") from None
        except (Malformed, ConfigError) as error:
            # Only the line number and why: the line may hold a password.
            raise Unavailable(f"passwd-file {path} line {number}: {error}") from None
        account.lines.append(line)
        if nologin is not None and account.nologin is None:
            users[user] = account = account._replace(nologin=nologin)
        samples.setdefault((line.entry.handler, rounds_of(line.entry.handler, line.entry.hash)),
                           line.entry)  # fmt: skip
    kind = costliest(samples, path, "passwd-file")
    log.info(
        "passwd-file %s: %d users, %d passwords; unknown names cost %s",
        path,
        len(users),
        sum(len(account.lines) for account in users.values()),
        describe(kind) if kind is not None else "nothing (no users)",
    )
    # The dummy is a real line of the costliest scheme, checked against the given password
    # and the answer thrown away: the same parameters (argon2 memory, SCRAM iterations) as
    # the slowest real check, without hashing anything at load time.
    return Table(users, samples[kind] if kind is not None else None)


def matches(entry: Entry, password: bytes) -> bool:
    if entry.handler is not None and entry.handler.name == "bcrypt" and len(password) > BCRYPT_MAX:
        spend(entry, password)  # refused, after the work a real check costs
        return False
    try:
        return entry.verify(password)
    except ValueError:  # a password libpass will not hash (> 4 KiB)
        return False


def nologin_refusal(account: Account, user: str, path: str) -> str | None:
    if account.nologin is None:
        return None
    return f"nologin for {user} in {path}" + (f": {account.nologin}" if account.nologin else "")


def check(
    table: Table, path: str, user: str, password: bytes, client: ClientIdentity
) -> tuple[Outcome, Line | None]:
    """Blocking: every line of the user is checked (or one dummy for an unknown user).
    The line is the one that accepted, if any."""
    account = table.users.get(user)
    if account is None:
        spend(table.dummy, password)
        return reject(f"no such user in {path}"), None
    refusal = None
    for line in account.lines:
        if not matches(line.entry, password):
            continue
        nologin = nologin_refusal(account, user, path)
        if nologin is not None:
            return reject(nologin), None
        why = line.refusal(user, client, PASSWORD_MECHANISMS)
        if why is None:
            what = f"app password {line.label!r}" if line.label else "password"
            return accept(f"{what} matches (line {line.number})", user), line
        refusal = refusal or why
    return reject(refusal or f"password mismatch for {user} in {path}"), None


def plain_salt(user: str) -> bytes:
    """The salt of keys derived from a user's {PLAIN} lines: one per user (so that all
    of them can answer one exchange), the same in every process, and made as an unknown
    name's fake one is (ofmipd.scram_salts), so that it does not say who exists."""
    from ofmipd.scram_salts import salt_for

    return salt_for(user)


def keys_for(
    table: Table, path: str, user: str, mechanism: str, client: ClientIdentity
) -> list[ScramKeys] | Outcome:
    """SCRAM keys of the user's lines that can serve `mechanism` (SCRAM-SHA-256[-PLUS]),
    each with the reason its scope refuses this client, if it does. The scope is judged
    as for PLAIN (nologin, allow_nets, expires=, mechanisms=); the exchange then tells a
    right password out of scope from a wrong one."""
    scheme = mechanism.removesuffix("-PLUS")
    # mechanisms=SCRAM-SHA-256 admits its -PLUS variant too (the same keys, bound to TLS);
    # mechanisms=SCRAM-SHA-256-PLUS alone refuses the unbound one.
    served = frozenset({mechanism, scheme})
    account = table.users.get(user)
    if account is None:
        return reject(f"no such user in {path}")
    nologin = nologin_refusal(account, user, path)
    keys = []
    for line in account.lines:
        if line.scheme == scheme:
            found = SCRAM[scheme].parse(line.entry.hash, line.label)
        elif line.entry.handler is PlainScheme:
            digest, salt = SCRAM[scheme].digest, plain_salt(user)
            password = line.entry.hash.encode("utf-8", "surrogateescape")
            stored, server = derive(password, salt, SCRAM_ITERATIONS, digest)
            found = ScramKeys(salt, SCRAM_ITERATIONS, stored, server, line.label)
        else:
            continue  # a one-way hash of the password: no SCRAM keys in it
        refusal = nologin or line.refusal(user, client, served)
        keys.append(found._replace(user=user, refusal=refusal))
    if not keys:
        return reject(f"no {scheme} credentials for {user} in {path}")
    return keys


class PasswdFile:
    name = "passwd-file"

    def __init__(self, path: str, workers: int, timeout: float) -> None:
        self.path = path
        self.target = path
        self.file = WatchedFile("passwd-file", path, lambda data: parse(data, path), self._check)
        try:
            self.file.get()  # fail at start-up, not at the first login
        except Unavailable as error:
            raise ConfigError(str(error)) from None
        self.offload = Offload("passwd-file", workers=workers, max_queue_age=timeout)
        self.store: Store | None = None  # where app passwords' last use goes (build_app sets it)

    def _check(self, st: os.stat_result) -> None:
        mode = stat.S_IMODE(st.st_mode)
        if mode not in ALLOWED_MODES:
            raise Unavailable(
                f"passwd-file {self.path} has mode {mode:04o}; it must be 0600 or 0640"
            )

    def _table(self) -> Table | Outcome:
        try:
            return self.file.get()
        except Unavailable as error:
            return tempfail(str(error))

    def _verify_blocking(
        self, user: str, password: bytes, client: ClientIdentity
    ) -> tuple[Outcome, Line | None]:
        table = self._table()
        if isinstance(table, Outcome):
            return table, None
        return check(table, self.path, user, password, client)

    def _keys_blocking(
        self, user: str, mechanism: str, client: ClientIdentity
    ) -> list[ScramKeys] | Outcome:
        table = self._table()
        if isinstance(table, Outcome):
            return table
        return keys_for(table, self.path, user, mechanism, client)

    async def verify(self, user: str, secret: Secret, client: ClientIdentity) -> Outcome:
        outcome, line = await self.offload.run(self._verify_blocking, user, secret.reveal(), client)
        if line is not None and line.label is not None and self.store is not None:
            await self.record_use(user, line.label, client)
        return outcome

    async def record_use(self, user: str, label: str, client: ClientIdentity) -> None:
        """Last use of an app password: in the store, never in the file (which is the
        admin's, and may be read-only to us)."""
        from ofmipd.store import StoreDown

        if self.store is None:  # no store configured (--ratelimit off, no quotas)
            return
        value = f"{int(time.time())} {client.ip or '-'}"
        try:
            await self.store.put(last_use_key(user, label), value, LAST_USE_SECONDS)
        except StoreDown as error:  # a login does not fail for want of a footnote
            log.warning("passwd-file: last use of %s/%s not recorded: %s", user, label, error)

    async def scram_keys(
        self, user: str, mechanism: str, client: ClientIdentity
    ) -> list[ScramKeys] | Outcome:
        if mechanism.removesuffix("-PLUS") not in SCRAM:
            return tempfail(f"no {mechanism} in a passwd-file")
        return await self.offload.run(self._keys_blocking, user, mechanism, client)

    async def close(self) -> None:
        self.offload.close()


def create(spec: BackendSpec) -> PasswdFile:
    settings = BACKEND.settings(spec)
    # Absolute, because a daemon may change directory after start-up.
    path = os.path.abspath(settings["path"])
    return PasswdFile(path, settings["workers"] or os.cpu_count() or 2, settings["timeout"])
