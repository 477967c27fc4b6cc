"""htpasswd authenticator: Apache htpasswd files, hashes verified in a bounded worker pool.

Read as Apache's mod_authn_file reads them: `#` comments and blank lines skipped, the user
name up to the first colon (case-sensitive), the hash up to the next colon, first match
wins. Hashes are those `htpasswd` writes, recognised by our own CryptContext. libpass's
ready-made htpasswd_context is not used because it ends in a plaintext scheme that
accepts anything it does not recognise as a password: `!locked` would "verify" against
the password `!locked`. Here an unrecognised or malformed hash never matches.

Unknown users, unusable entries and passwords too long to hash cost one verification
against a dummy hash of the most expensive scheme and cost in the file, so they take as
long as the slowest real check: timing does not tell an unknown name from a known one.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from typing import Any, NamedTuple

from passlib.context import CryptContext
from passlib.utils import MAX_PASSWORD_SIZE

from auth_backends.kinds import HTPASSWD as BACKEND
from auth_backends.watched_file import Unavailable, WatchedFile
from ofmipd.auth import Outcome, Secret, accept, reject, tempfail
from ofmipd.config import BackendSpec
from ofmipd.errors import ConfigError
from ofmipd.identity import ClientIdentity
from ofmipd.offload import Offload

log = logging.getLogger("ofmipd.htpasswd")

# What `htpasswd` writes: -B, -m, -s, -2, -5; plus $1$, which Apache accepts through
# crypt(3). Not DES crypt (-d): it ignores all but 8 characters of the password.
CONTEXT = CryptContext(
    schemes=["bcrypt", "apr_md5_crypt", "ldap_sha1", "sha256_crypt", "sha512_crypt", "md5_crypt"]
)
BCRYPT_MAX = 72  # bcrypt ignores later bytes; libpass raises instead of truncating
Kind = tuple[Any, int | None]  # (libpass handler, rounds): what a check costs


class Entry(NamedTuple):
    hash: str
    handler: Any | None  # the libpass handler class; None = unusable, never matches

    def verify(self, password: bytes) -> bool:
        """True/False; raises ValueError for a password or hash the scheme cannot take."""
        assert self.handler is not None
        return bool(self.handler.verify(password, self.hash))


class Table(NamedTuple):
    users: dict[str, Entry]
    dummy: Entry | None  # None when no entry is usable: then there is nobody to hide


def classify(hash_text: str) -> tuple[Any | None, int | None]:
    """(handler, rounds) for a hash libpass can verify, else (None, None)."""
    try:
        handler = CONTEXT.identify(hash_text, resolve=True, required=False)
        if handler is None:
            return None, None
        parsed = handler.from_string(hash_text)  # identify looks at the prefix only
    except (ValueError, TypeError):
        return None, None
    return handler, getattr(parsed, "rounds", None)


def cost(entry: Entry) -> float:
    """CPU seconds of one check against `entry`. Thread time, not wall time: the load of
    other processes does not count, so the comparison holds on a busy machine."""
    # ASCII: some backends refuse other bytes at once, which would measure nothing. The
    # first use of a scheme loads and self-tests its backend: measure the second check.
    password = os.urandom(16).hex().encode()
    spend(entry, password)
    started = time.thread_time()
    spend(entry, password)
    return time.thread_time() - started


def costliest(samples: dict[Kind, Entry], path: str, what: str = "htpasswd") -> Kind | None:
    """The file's most expensive scheme and cost, which the dummy hash uses.

    The most expensive, not the most common: an unknown name must take as long as the
    slowest real user, or a fast answer would tell that the name does not exist."""
    if len(samples) <= 1:
        return next(iter(samples), None)
    costs = {kind: cost(entry) for kind, entry in samples.items()}
    if min(costs.values()) * 4 < max(costs.values()):
        # Users with a much cheaper hash answer faster than an unknown name, which tells
        # them apart; only rehashing them fixes that.
        log.warning(
            "%s %s mixes hash costs (%s): users with cheaper hashes answer faster than "
            "unknown names; rehash them in the costliest scheme",
            what,
            path,
            ", ".join(
                f"{describe(kind)} {seconds * 1000:.1f} ms" for kind, seconds in costs.items()
            ),
        )
    return max(costs, key=costs.__getitem__)


def make_dummy(kind: Kind) -> Entry:
    """A hash of a random password (nobody knows it) of this scheme and cost."""
    handler, rounds = kind
    maker = handler.using(rounds=rounds) if rounds is not None else handler
    # Costs one real hash per file load, in a worker thread (loads happen in verify).
    return Entry(maker.hash(os.urandom(16).hex()), handler)


def describe(kind: Kind) -> str:
    handler, rounds = kind
    return str(handler.name) + (f" rounds {rounds}" if rounds is not None else "")


def parse(data: bytes, path: str) -> Table:
    users: dict[str, Entry] = {}
    samples: dict[Kind, Entry] = {}  # one entry of each scheme and cost in the file
    unusable: list[str] = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        name, colon, rest = line.partition(b":")
        try:
            user = name.decode("utf-8")
        except UnicodeDecodeError:
            # Only the line number: the line may hold a pasted password.
            log.warning("htpasswd %s line %d: user name is not UTF-8; ignored", path, number)
            continue
        # Hashes are ASCII; anything else becomes U+FFFD, which no scheme accepts.
        hash_text = rest.partition(b":")[0].decode("ascii", "replace")
        if not colon or not user:
            log.warning("htpasswd %s line %d: not user:hash; ignored", path, number)
            continue
        if user in users:
            continue  # mod_authn_file stops at the first match
        handler, rounds = classify(hash_text)
        users[user] = Entry(hash_text, handler)
        if handler is None:
            unusable.append(user)
        else:
            samples.setdefault((handler, rounds), users[user])
    kind = costliest(samples, path)
    log.info(
        "htpasswd %s: %d users, %d with no usable hash%s; unknown names cost %s",
        path,
        len(users),
        len(unusable),
        f" ({', '.join(unusable[:10])}{', ...' if len(unusable) > 10 else ''})" if unusable else "",
        describe(kind) if kind is not None else "nothing (no usable hash)",
    )
    return Table(users, make_dummy(kind) if kind is not None else None)


def check(table: Table, path: str, user: str, password: bytes) -> Outcome:
    """Blocking: one verification, real or dummy, whatever the answer turns out to be."""
    entry = table.users.get(user)
    if entry is None or entry.handler is None:
        spend(table.dummy, password)
        if entry is None:
            return reject(f"no such user in {path}")
        return reject(f"unusable hash for {user} in {path}")
    if entry.handler.name == "bcrypt" and len(password) > BCRYPT_MAX:
        # Apache would compare only the first 72 bytes; we refuse instead of letting any
        # tail through, but only after the same work as a real check, to keep timing flat.
        spend(entry, password)
        return reject(f"password longer than bcrypt's {BCRYPT_MAX} bytes for {user} in {path}")
    try:
        matched = entry.verify(password)
    except ValueError as error:  # PasswordSizeError (> 4 KiB), a hash that parses but is bad
        # Raised before any hashing: spend the dummy's time, or a long password would
        # answer at once for a known user and slowly for an unknown one.
        spend(table.dummy, password)
        return reject(f"cannot verify {user} in {path}: {type(error).__name__}")
    if matched:
        return accept("password matches", user)
    return reject(f"password mismatch for {user} in {path}")


def spend(entry: Entry | None, password: bytes) -> None:
    """Verify against `entry` and ignore the result: time spent, nothing learned."""
    if entry is None or entry.handler is None:
        return
    # Cut to what the scheme takes, so an overlong password still costs a full check.
    password = password[: BCRYPT_MAX if entry.handler.name == "bcrypt" else MAX_PASSWORD_SIZE]
    try:
        entry.verify(password)
    except ValueError:
        pass


class Htpasswd:
    name = "htpasswd"

    def __init__(self, path: str, workers: int, timeout: float) -> None:
        self.path = path
        self.target = path
        self._world_readable_warned = False
        self.file = WatchedFile("htpasswd", path, lambda data: parse(data, path), self._check_mode)
        try:
            self.file.get()  # fail at start-up, not at the first login
        except Unavailable as error:
            raise ConfigError(str(error)) from None
        # bcrypt holds the CPU for its whole run: more workers than cores only adds queueing.
        self.offload = Offload("htpasswd", workers=workers, max_queue_age=timeout)

    def _check_mode(self, st: os.stat_result) -> None:
        # Not an error: htpasswd files are often group-readable by the web server. But hashes
        # anyone can read can be attacked offline, so say so once.
        world = bool(st.st_mode & stat.S_IROTH)
        if world and not self._world_readable_warned:
            log.warning(
                "htpasswd %s is world-readable (mode %04o): local users can copy the hashes",
                self.path,
                stat.S_IMODE(st.st_mode),
            )
        self._world_readable_warned = world

    def _verify_blocking(self, user: str, password: bytes) -> Outcome:
        try:
            table = self.file.get()
        except Unavailable as error:
            return tempfail(str(error))
        return check(table, self.path, user, password)

    async def verify(self, user: str, secret: Secret, client: ClientIdentity) -> Outcome:
        return await self.offload.run(self._verify_blocking, user, secret.reveal())

    async def close(self) -> None:
        self.offload.close()


def create(spec: BackendSpec) -> Htpasswd:
    settings = BACKEND.settings(spec)
    # Absolute, because a daemon may change directory after start-up.
    path = os.path.abspath(settings["path"])
    return Htpasswd(path, settings["workers"] or os.cpu_count() or 2, settings["timeout"])
