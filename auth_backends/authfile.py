"""authfile authenticator: tmda-ofmipd's plaintext `user:password` file (mode 0400 or 0600).

Format, as tmda-ofmipd read it: one `user:password` per line, the password being everything
after the first colon; surrounding whitespace of the line, the name and the password is
ignored; user names match case-insensitively. Added here: `#` comment lines, and an empty
password disables the account (tmda denied those too). Since the passwords are plaintext,
this store can hand them to the chain for CRAM-MD5, and derive SCRAM keys from them.

SCRAM keys are derived at the first SCRAM login of a user and cached with a salt drawn at
random once per user for the life of the process. Nothing is stored, so nothing needs a
stable salt: a salt only has to be unpredictable and differ between users and servers, so
that precomputed tables are useless; a restart drawing new ones merely costs the next
login one key derivation (4096 PBKDF2 rounds, a few ms).
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat

from auth_backends.kinds import AUTHFILE as BACKEND
from auth_backends.watched_file import Unavailable, WatchedFile
from ofmipd.auth import Found, Outcome, ScramKeys, Secret, accept, reject, tempfail
from ofmipd.config import BackendSpec
from ofmipd.errors import ConfigError
from ofmipd.identity import ClientIdentity

log = logging.getLogger("ofmipd.authfile")

ALLOWED_MODES = (0o400, 0o600)  # plaintext passwords: nobody but the owner may read them

# lowercased name -> (name as written in the file, password)
Users = dict[str, tuple[str, bytes]]


def parse(data: bytes, path: str) -> Users:
    """Bytes of an authfile -> users. Bad lines are skipped with a warning naming only the
    line number: a line without a colon may well be a password someone pasted."""
    users: Users = {}
    for number, raw in enumerate(data.split(b"\n"), 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        name, colon, password = line.partition(b":")
        try:
            user = name.strip().decode("utf-8")
        except UnicodeDecodeError:
            log.warning("authfile %s line %d: user name is not UTF-8; ignored", path, number)
            continue
        if not colon or not user:
            log.warning("authfile %s line %d: not user:password; ignored", path, number)
            continue
        key = user.lower()
        if key in users:
            # tmda-ofmipd kept the last one too (a dict filled line by line).
            log.warning("authfile %s line %d: %s appears again; this line wins", path, number, user)
        # Passwords stay bytes: clients send bytes, and a Latin-1 file must still match.
        users[key] = (user, password.strip())
    return users


class AuthFile:
    name = "authfile"

    def __init__(self, path: str) -> None:
        self.path = path
        self.target = path
        self.file = WatchedFile("authfile", path, lambda data: parse(data, path), self._check_mode)
        try:
            users = self.file.get()
        except Unavailable as error:
            raise ConfigError(str(error)) from None
        log.info("authfile %s: %d users", path, len(users))
        # (name, hash) -> (the password they came from, its keys)
        self._scram: dict[tuple[str, str], tuple[bytes, ScramKeys]] = {}

    def _check_mode(self, st: os.stat_result) -> None:
        mode = stat.S_IMODE(st.st_mode)
        if mode not in ALLOWED_MODES:
            raise Unavailable(f"authfile {self.path} has mode {mode:04o}; it must be 0400 or 0600")

    def _find(self, user: str) -> tuple[str, bytes] | Outcome:
        """The entry for `user`, or the Outcome that says why there is none."""
        try:
            users = self.file.get()
        except Unavailable as error:
            # A file that vanished or went world-readable is the admin's slip, not the
            # client's wrong password: "try later" keeps mail queued, not bounced.
            return tempfail(str(error))
        entry = users.get(user.lower())
        if entry is None:
            return reject(f"no such user in {self.path}")
        if not entry[1]:
            return reject(f"empty password for {entry[0]} in {self.path}: login disabled")
        return entry

    async def verify(self, user: str, secret: Secret, client: ClientIdentity) -> Outcome:
        entry = self._find(user)
        if isinstance(entry, Outcome):
            return entry
        name, password = entry
        if secret.matches(password):
            return accept("password matches", name)
        return reject(f"password mismatch for {name} in {self.path}")

    async def lookup_plaintext(self, user: str, client: ClientIdentity) -> Found | Outcome:
        entry = self._find(user)
        if isinstance(entry, Outcome):
            return entry
        name, password = entry
        return Found(Secret(password), name)

    async def scram_keys(
        self, user: str, mechanism: str, client: ClientIdentity
    ) -> list[ScramKeys] | Outcome:
        hash_name = mechanism.removeprefix("SCRAM-").removesuffix("-PLUS")
        entry = self._find(user)
        if isinstance(entry, Outcome):
            return entry
        name, password = entry
        key = (user, hash_name)  # the salt follows the name as sent
        cached = self._scram.get(key)
        if cached is not None and cached[0] == password:  # re-derived when the file changes
            return [cached[1]]
        try:
            text = password.decode("utf-8")
        except UnicodeDecodeError:
            return reject(f"password of {name} in {self.path} is not UTF-8: no SCRAM keys")
        from ofmipd.scram import derive_keys  # scramp: only when SCRAM is used
        from ofmipd.scram_salts import salt_for

        # As an unknown name's fake salt is made, from the name as sent: nothing differs.
        salt = salt_for(user)
        try:
            # PBKDF2 (4096 rounds, ~1.3 ms): off the loop, like every other hash check
            derived = await asyncio.to_thread(derive_keys, text, hash_name, salt, None)
            keys = derived._replace(user=name)
        except ValueError:  # SASLprep refuses some passwords
            return reject(f"password of {name} in {self.path} fails SASLprep: no SCRAM keys")
        if len(self._scram) >= 4096:  # case variants of long names: not without bound
            self._scram.clear()
        self._scram[key] = (password, keys)
        return [keys]


def create(spec: BackendSpec) -> AuthFile:
    settings = BACKEND.settings(spec)
    # Absolute, because a daemon may change directory after start-up.
    return AuthFile(os.path.abspath(settings["path"]))
