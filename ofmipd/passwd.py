"""`ofmipd-passwd`: manage a Dovecot-compatible passwd-file and its app passwords.

Every change is written whole to a temporary file in the same directory, fsynced and
renamed over the old one (keeping its mode and owner), under an exclusive lock on
FILE.lock, so concurrent writers are serialised and a reader (ofmipd, Dovecot) sees the
old file or the new one, never half of either. The new text is parsed by the server's own
parser before it is written: this command never leaves a file the server would refuse.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import secrets
import sys
from collections.abc import Callable, Iterator

from ofmipd.errors import ConfigError

EXIT_ACCEPT, EXIT_REJECT, EXIT_TEMPFAIL, EXIT_USAGE = 0, 1, 111, 2
SCHEMES = ("SCRAM-SHA-256", "SCRAM-SHA-1", "BLF-CRYPT", "ARGON2ID", "SHA512-CRYPT",
           "SHA256-CRYPT", "SSHA512", "PLAIN")  # fmt: skip
# No look-alikes (0/O, 1/l/I): app passwords get typed on phones. 24 of 54 symbols: 138 bits.
ALPHABET = "abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
APP_PASSWORD_LENGTH = 24


EPILOG = """\
commands (ofmipd-passwd COMMAND --help shows one):
  add USER [--scheme S]
      set USER's main password, prompted twice without echo on a terminal, else the
      first line of stdin; replaces the old one and keeps its extra fields
  app-add USER LABEL [--allow-nets CIDR,...] [--expires YYYY-MM-DD]
                     [--mechanisms MECH,...] [--scheme S]
      generate a 24-character app password, store only its hash, and print it once,
      alone on the last line of stdout; LABEL: letters, digits, . _ @ + -
  app-list USER
      label, allow_nets, mechanisms, expiry and last use (time and address, read from
      the state directory of the server --config names) of USER's app passwords
  app-revoke USER LABEL
      delete the app password LABEL of USER (exit 1 if there is none)
  verify USER [--remote-ip IP]
      check the password on stdin's first line as ofmipd would for a PLAIN login from
      IP (default 127.0.0.1), scope included; prints the decision; exit 0/1/111

schemes (--scheme, default SCRAM-SHA-256): SCRAM-SHA-256 and SCRAM-SHA-1 serve SCRAM
and PLAIN/LOGIN; BLF-CRYPT, ARGON2ID, SHA512-CRYPT, SHA256-CRYPT, SSHA512 serve
PLAIN/LOGIN only; PLAIN stores the password itself (and serves SCRAM too). Hashes
are written as `doveadm pw -s SCHEME` writes them. A user's SCRAM lines get one salt,
so that each of the user's app passwords can log in with SCRAM (a SCRAM server names
one salt).

examples:
  ofmipd-passwd --file /etc/ofmipd/users add alice
  printf '%s\\n' "$PW" | ofmipd-passwd --file /etc/ofmipd/users add bob --scheme ARGON2ID
  ofmipd-passwd --file /etc/ofmipd/users app-add alice phone --expires 2027-06-30
  ofmipd-passwd --file /etc/ofmipd/users app-add alice office \\
      --allow-nets 192.0.2.0/24,2001:db8::/32 --mechanisms SCRAM-SHA-256
  ofmipd-passwd --config /etc/ofmipd/ofmipd.toml app-list alice
  ofmipd-passwd --config /etc/ofmipd/ofmipd.toml app-revoke alice phone
  ofmipd-passwd --file /etc/ofmipd/users verify alice --remote-ip 192.0.2.7 < pw-file
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ofmipd-passwd",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="Manage a Dovecot-compatible passwd-file (ofmipd --passwd-file) and its\n"
        "app passwords. Writes are atomic (temporary file, fsync, rename, same mode and\n"
        "owner) and serialised by a lock on FILE.lock. Exit 0 done (verify: accepted),\n"
        "1 not found (verify: rejected), 111 temporary failure, 2 usage error.",
    )
    parser.add_argument(
        "--file", metavar="FILE", help="the passwd-file (default: the one --config names)"
    )
    parser.add_argument(
        "--config",
        metavar="TOML",
        help="an ofmipd configuration: its passwd-file, and the store (state directory) "
        "app-list reads last use from",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = commands.add_parser(
        "add",
        help="set USER's main password (prompted without echo, or the first line of stdin)",
    )
    add.add_argument("user", help="the login name, as the file spells it")
    add.add_argument("--scheme", default="SCRAM-SHA-256", choices=SCHEMES, type=str.upper,
                     help="hash scheme (default SCRAM-SHA-256)")  # fmt: skip
    app = commands.add_parser(
        "app-add",
        help="generate an app password LABEL for USER; printed once, alone on the last line",
    )
    app.add_argument("user", help="the login name, as the file spells it")
    app.add_argument("label", help="the device or program, e.g. phone (. _ @ + - allowed)")
    app.add_argument("--allow-nets", metavar="CIDR,...", help="only from these networks")
    app.add_argument("--expires", metavar="YYYY-MM-DD", help="last day it works (UTC)")
    app.add_argument("--mechanisms", metavar="MECH,...",
                     help="only these AUTH mechanisms, e.g. SCRAM-SHA-256 (which admits "
                     "SCRAM-SHA-256-PLUS too)")  # fmt: skip
    app.add_argument("--scheme", default="SCRAM-SHA-256", choices=SCHEMES, type=str.upper,
                     help="hash scheme (default SCRAM-SHA-256)")  # fmt: skip
    listing = commands.add_parser(
        "app-list", help="USER's app passwords: label, scope, expiry, last use (with --config)"
    )
    listing.add_argument("user", help="the login name")
    revoke = commands.add_parser("app-revoke", help="delete USER's app password LABEL")
    revoke.add_argument("user", help="the login name")
    revoke.add_argument("label", help="the app password's label")
    verify = commands.add_parser(
        "verify", help="check USER's password from stdin; exit 0/1/111 like ofmipd-authtest"
    )
    verify.add_argument("user", help="the login name")
    verify.add_argument("--remote-ip", default="127.0.0.1", metavar="IP",
                        help="judge allow_nets for a client at IP (default 127.0.0.1)")  # fmt: skip
    return parser


def file_from_config(path: str) -> str:
    from ofmipd.config import load_toml

    for spec in load_toml(path).auth:
        if spec.kind == "passwd-file" and isinstance(spec.options.get("path"), str):
            return os.path.abspath(spec.options["path"])
    raise ConfigError(f'config {path}: no [[auth]] kind = "passwd-file" with a path')


def hash_password(password: bytes, scheme: str, salt: bytes | None = None) -> str:
    """{SCHEME}hash, as `doveadm pw -s SCHEME` would write it. `salt`: a SCRAM salt to
    use rather than a new random one (see shared_salt)."""
    import base64

    from auth_backends import passwd_file

    if scheme in passwd_file.SCRAM:
        salt = salt or os.urandom(16)
        iterations = passwd_file.SCRAM_ITERATIONS
        stored, server = passwd_file.derive(
            password, salt, iterations, passwd_file.SCRAM[scheme].digest
        )
        fields = [str(iterations), *(base64.b64encode(v).decode() for v in (salt, stored, server))]
        return f"{{{scheme}}}" + ",".join(fields)
    if scheme == "PLAIN":
        text = password.decode("utf-8", "surrogateescape")
        if any(c in text for c in ":\n\r") or text != text.strip():
            raise ConfigError("this password cannot be stored as {PLAIN}: choose another scheme")
        return "{PLAIN}" + text
    handler, prefix = passwd_file.handler_for(scheme)
    if scheme == "BLF-CRYPT":
        handler = handler.using(ident="2y")
    elif scheme == "ARGON2ID":
        handler = handler.using(type="ID")
    return f"{{{scheme}}}" + handler.hash(password).removeprefix(prefix)


def shared_salt(lines: list[str], user: str, scheme: str, skip_main: bool = False) -> bytes | None:
    """The salt of `user`'s {`scheme`} lines (SCRAM only), so that a new one gets it too.

    A SCRAM exchange sends one salt before the client proves anything, so only the lines
    with that salt can be checked (auth.scram_candidates): with one salt per user and
    hash, every app password of the user works with SCRAM. This costs nothing worth
    having: the salt is still random and the user's own, so tables and work on other
    users stay useless; a guess at the main password still costs one PBKDF2 (it now also
    tests the app passwords, which are 138 random bits: out of reach anyway); and a salt
    is no secret, SCRAM sends it to anyone who asks. `skip_main`: the main password is
    being replaced, so its salt does not count.
    """
    from auth_backends import passwd_file

    if scheme not in passwd_file.SCRAM:
        return None
    for line in lines:
        owner = owner_and_label(line)
        if owner is None or owner[0] != user or (skip_main and owner[1] is None):
            continue
        hashed = line.strip().split(":", 7)[1]
        if not hashed.upper().startswith(f"{{{scheme}}}"):
            continue
        try:
            keys = passwd_file.SCRAM[scheme].parse(hashed[len(scheme) + 2 :])
        except ValueError:
            continue
        if keys.iterations == passwd_file.SCRAM_ITERATIONS:
            return keys.salt
    return None


def read_password() -> bytes:
    if sys.stdin.isatty():
        import getpass

        try:
            first = getpass.getpass("New password: ")
            if getpass.getpass("Again: ") != first:
                raise ConfigError("the two passwords differ")
        except (EOFError, KeyboardInterrupt):
            raise ConfigError("no password given") from None
        password = first.encode()
    else:
        password = sys.stdin.buffer.readline().rstrip(b"\r\n")
    if not password or b"\0" in password:
        raise ConfigError("no password on stdin (give it as the first line)")
    return password


# ---- the file, as lines --------------------------------------------------------------


def owner_and_label(line: str) -> tuple[str, str | None] | None:
    """(user, label) of a password line; None for comments and blank lines."""
    from auth_backends.passwd_file import Malformed, parse_extra

    text = line.strip()
    if not text or text.startswith("#"):
        return None
    fields = text.split(":", 7)
    try:
        extra = parse_extra(fields[7]) if len(fields) == 8 else {}
    except Malformed as error:
        raise ConfigError(f"not written: {fields[0]}'s line: {error}") from None
    return fields[0], extra.get("label") or None


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW  # root: no planted link
    fd = os.open(path + ".lock", flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as handle:
            return handle.read().splitlines()
    except FileNotFoundError:
        return []
    except OSError as error:
        raise ConfigError(f"passwd-file {path}: {error.strerror}") from None


def write_atomically(path: str, lines: list[str]) -> None:
    """Temporary file, fsync, rename; the mode and owner of the file it replaces."""
    import tempfile

    from auth_backends.passwd_file import parse
    from auth_backends.watched_file import Unavailable

    data = "".join(line + "\n" for line in lines).encode("utf-8", "surrogateescape")
    try:
        parse(data, path)  # what the server would say about it
    except Unavailable as error:
        raise ConfigError(f"not written: {error}") from None
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None
    directory = os.path.dirname(path) or "."
    fd, temporary = tempfile.mkstemp(prefix=".ofmipd-passwd.", dir=directory)
    try:
        os.fchmod(fd, st.st_mode & 0o7777 if st else 0o600)
        if st is not None and (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
            os.fchown(fd, st.st_uid, st.st_gid)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(temporary, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        os.unlink(temporary)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def edit(path: str, change: Callable[[list[str]], list[str]]) -> None:
    # A symlinked file (one user file shared with Dovecot's, say) is written where it
    # really is: a rename over the link would replace the link, and the two would part.
    path = os.path.realpath(path)
    with locked(path):
        write_atomically(path, change(read_lines(path)))


# ---- commands --------------------------------------------------------------------------


def add(path: str, user: str, scheme: str) -> int:
    password = read_password()

    def change(lines: list[str]) -> list[str]:
        hashed = hash_password(password, scheme, shared_salt(lines, user, scheme, skip_main=True))
        owners = [owner_and_label(line) for line in lines]
        if (user, None) in owners:
            i = owners.index((user, None))
            fields = lines[i].strip().split(":", 2)
            lines[i] = ":".join([user, hashed, *fields[2:]])  # keeps the extra fields
            return lines
        # Before the user's app passwords: Dovecot expects one line per user, the first.
        mine = [i for i, owner in enumerate(owners) if owner and owner[0] == user]
        lines.insert(mine[0] if mine else len(lines), f"{user}:{hashed}")
        return lines

    edit(path, change)
    print(f"password of {user} set ({scheme})")
    return EXIT_ACCEPT


def app_add(path: str, args: argparse.Namespace) -> int:
    import shlex

    password = "".join(secrets.choice(ALPHABET) for _ in range(APP_PASSWORD_LENGTH))
    extra = [f"label={shlex.quote(args.label)}"]
    for key in ("allow_nets", "expires", "mechanisms"):
        value = getattr(args, key)
        if value:
            extra.append(f"{key}={shlex.quote(value)}")

    def change(lines: list[str]) -> list[str]:
        if (args.user, args.label) in {owner_and_label(old) for old in lines}:
            raise ConfigError(f"{args.user} already has an app password {args.label!r}")
        salt = shared_salt(lines, args.user, args.scheme)
        hashed = hash_password(password.encode(), args.scheme, salt)
        return [*lines, f"{args.user}:{hashed}::::::{' '.join(extra)}"]

    edit(path, change)
    print(f"app password {args.label!r} of {args.user} added; it is shown only once:")
    print(password)
    return EXIT_ACCEPT


def last_uses(config_path: str | None, user: str, labels: list[str]) -> dict[str, str]:
    """label -> "TIME from ADDRESS", from the store of the configuration's server."""
    if config_path is None:
        return {}
    import time

    from auth_backends.passwd_file import last_use_key
    from ofmipd.config import load_toml
    from ofmipd.ratelimit import open_store

    config = load_toml(config_path)
    options = dict(config.ratelimit_options)
    store = open_store(config.ratelimit or "", options, state_dir=config.state_dir,
                       username=config.username)  # fmt: skip

    async def read() -> dict[str, str]:
        found = {}
        try:
            for label in labels:
                value = await store.get(last_use_key(user, label))
                if value:
                    when, _, ip = value.partition(" ")
                    stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(int(when)))
                    found[label] = f"{stamp} from {ip}"
        finally:
            await store.close()
        return found

    return asyncio.run(read())


def app_list(path: str, user: str, config_path: str | None = None) -> int:
    from auth_backends.passwd_file import parse
    from auth_backends.watched_file import Unavailable

    with open(path, "rb") as handle:
        data = handle.read()
    try:
        table = parse(data, path)
    except Unavailable as error:
        raise ConfigError(str(error)) from None
    account = table.users.get(user)
    if account is None:
        print(f"ofmipd-passwd: no such user {user} in {path}", file=sys.stderr)
        return EXIT_REJECT
    apps = [line for line in account.lines if line.label is not None]
    used = last_uses(config_path, user, [line.label for line in apps if line.label])
    unknown = "never" if config_path else "(give --config)"
    print("label\tallow_nets\tmechanisms\texpires\tlast use")
    for line in apps:
        assert line.label is not None
        mechanisms = ",".join(sorted(line.mechanisms)) if line.mechanisms else "any"
        expires = line.expires.isoformat() if line.expires else "never"
        last = used.get(line.label, unknown)
        print(f"{line.label}\t{line.nets or 'any'}\t{mechanisms}\t{expires}\t{last}")
    return EXIT_ACCEPT


def app_revoke(path: str, user: str, label: str) -> int:
    found = []

    def change(lines: list[str]) -> list[str]:
        kept = [line for line in lines if owner_and_label(line) != (user, label)]
        found.append(len(kept) != len(lines))
        return kept

    edit(path, change)
    if not found[0]:
        print(f"ofmipd-passwd: {user} has no app password {label!r}", file=sys.stderr)
        return EXIT_REJECT
    print(f"app password {label!r} of {user} revoked")
    return EXIT_ACCEPT


def verify(path: str, user: str, remote_ip: str) -> int:
    from auth_backends.passwd_file import PasswdFile
    from ofmipd.auth import Secret, Verdict
    from ofmipd.identity import ClientIdentity

    backend = PasswdFile(path, workers=1, timeout=30)
    password = read_password()
    client = ClientIdentity(remote_ip, source="ofmipd-passwd")
    outcome = asyncio.run(backend.verify(user, Secret(password), client))
    asyncio.run(backend.close())
    print(f"{outcome.verdict.value} ({outcome.reason})")
    return {Verdict.ACCEPT: EXIT_ACCEPT, Verdict.REJECT: EXIT_REJECT}.get(
        outcome.verdict, EXIT_TEMPFAIL
    )


def run(args: argparse.Namespace) -> int:
    if args.file:
        path = os.path.abspath(args.file)
    elif args.config:
        path = file_from_config(args.config)
    else:
        raise ConfigError("which file? give --file FILE or --config TOML")
    from ofmipd.auth import malformed_name

    why = malformed_name(args.user) or (":" in args.user and "colon in user name")
    if why:
        raise ConfigError(f"user {args.user!r}: {why}")
    label = getattr(args, "label", "x")
    if not label or not all(c.isalnum() or c in "._@+-" for c in label):
        raise ConfigError(f"label {label!r}: use letters, digits and . _ @ + - only")
    if args.command == "add":
        return add(path, args.user, args.scheme)
    if args.command == "app-add":
        return app_add(path, args)
    if args.command == "app-list":
        return app_list(path, args.user, args.config)
    if args.command == "app-revoke":
        return app_revoke(path, args.user, args.label)
    return verify(path, args.user, args.remote_ip)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import logging

    # The error a command ends with says it all; the server's warnings would repeat it.
    logging.basicConfig(level=logging.ERROR, format="ofmipd-passwd: %(message)s")
    try:
        return run(args)
    except ConfigError as error:
        print(f"ofmipd-passwd: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:
        print(f"ofmipd-passwd: {error.filename or ''}: {error.strerror}", file=sys.stderr)
        return EXIT_TEMPFAIL


if __name__ == "__main__":
    sys.exit(main())
