"""`ofmipd-authtest`: why can (or can't) this user log in, with this configuration?

It builds the authenticator chain through the same code as the server
(assemble.build_chain), asks it as the server would, and prints each backend's
answer, the host rule and ipauthmap route for the client, and the overall
verdict. Exit 0 accepted, 1 rejected, 111 temporary failure, 2 usage or
configuration error. With --checkpassword it is itself a DJB checkpassword
program backed by the ofmipd configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import logging.handlers
import os
import sys
import time
from typing import Any, NamedTuple

from ofmipd import identity, logs
from ofmipd.auth import Chain, Decision, Verdict
from ofmipd.cli import Parser, add_auth_options, auth_specs
from ofmipd.config import Config, load_toml, merge, validate
from ofmipd.errors import ConfigError
from ofmipd.logs import printable
from ofmipd.policy import ClientPolicy

EXIT = {Verdict.ACCEPT: 0, Verdict.REJECT: 1, Verdict.TEMPFAIL: 111}
MAX_CHECKPASSWORD_DATA = 512  # DJB's limit for user\0password\0timestamp\0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="ofmipd-authtest",
        description="Test a user's credentials against ofmipd's authenticators. The password "
        "is read from the first line of stdin, or prompted for without echo on a terminal. "
        "Exit 0 accepted, 1 rejected, 111 temporary failure, 2 usage or configuration error.",
    )
    add_auth_options(parser)
    parser.add_argument(
        "--remote-ip",
        default="127.0.0.1",
        metavar="IP",
        help="test as a client from this address (default 127.0.0.1)",
    )
    parser.add_argument(
        "--local-ip",
        default="",
        metavar="IP",
        help="the server address the client connected to (for ipauthmap)",
    )
    parser.add_argument("--rules", metavar="FILE", help="host rules to apply to --remote-ip")
    parser.add_argument(
        "--tls",
        choices=("optional", "localoptional", "on"),
        help="assume this STARTTLS mode when applying the rules (default: the config's)",
    )
    parser.add_argument(
        "--all", action="store_true", help="try every backend, not just until the first accept"
    )
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument(
        "--mechanism",
        type=str.upper,
        choices=("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-1"),
        default="PLAIN",
        help="decide as this AUTH mechanism would: SCRAM runs a whole exchange with the "
        "stores' SCRAM keys, playing the client with the password (default PLAIN)",
    )
    parser.add_argument(
        "--checkpassword",
        nargs=argparse.REMAINDER,
        metavar="PROG",
        help="act as a checkpassword program: read user\\0password\\0 from fd 3; on success "
        "become the user as DJB's checkpassword does (groups, gid, uid from the passwd "
        "database; $USER, $HOME, $SHELL; cd $HOME) and exec PROG (exit 0 without PROG). "
        "A user with no passwd entry exits 1. Give it last: the rest are PROG's arguments",
    )
    parser.add_argument(
        "--checkpassword-no-setuid",
        action="store_true",
        help="with --checkpassword: only set $USER before exec'ing PROG, for consumers that "
        "want just a verdict (Dovecot's checkpassword passdb, another ofmipd's -A)",
    )
    parser.add_argument(
        "--quota",
        metavar="USER",
        help="print USER's usage of each configured user quota and when its window resets "
        "(read from the server's store; no password is asked)",
    )
    parser.add_argument("user", nargs="?", help="the login name to test")
    return parser


def load_config(args: argparse.Namespace) -> Config:
    base = load_toml(args.config) if args.config else Config()
    config = merge(base, {"auth": auth_specs(args), "rules": args.rules})
    if not config.auth:
        raise ConfigError(
            "no authenticator configured: give -a, --htpasswd, -A, -m, -R or --config"
        )
    config = validate(config)  # what the server would refuse to start with is an error here too
    # --tls is a what-if for the rules display, so it needs no certificate.
    return config._replace(tls=args.tls) if args.tls else config


def client_from_args(args: argparse.Namespace) -> identity.ClientIdentity:
    ip = identity.normalise_ip(args.remote_ip)
    if not ip:
        raise ConfigError(f"--remote-ip {args.remote_ip!r}: not an IP address")
    local_ip = identity.normalise_ip(args.local_ip)
    if args.local_ip and not local_ip:
        raise ConfigError(f"--local-ip {args.local_ip!r}: not an IP address")
    return identity.ClientIdentity(ip=ip, local_ip=local_ip, source="authtest")


def read_password() -> bytes:
    """The first line of stdin, or a no-echo prompt on a terminal; ConfigError if none."""
    if sys.stdin.isatty():
        import getpass

        try:
            return getpass.getpass("Password: ").encode()
        except (EOFError, KeyboardInterrupt):
            raise ConfigError("no password given") from None
    line = sys.stdin.buffer.readline()
    if not line:
        raise ConfigError("no password on stdin (give it as the first line)")
    return line.rstrip(b"\r\n")


class ClientView(NamedTuple):
    """What the server would let this client do, before any password is checked."""

    client: identity.ClientIdentity
    policy: ClientPolicy
    tls_possible: bool  # some way to encrypt exists: STARTTLS, implicit TLS or a terminator
    routes: tuple[str, ...]  # ipauthmap lines: which remote server each backend would ask

    def as_dict(self) -> dict[str, Any]:
        return {
            "remote_ip": self.client.ip,
            "local_ip": self.client.local_ip or None,
            "rule": self.policy.rule,
            "deny": self.policy.deny,
            "deny_message": self.policy.deny_message if self.policy.deny else None,
            "relay": self.policy.relay,
            "tls_required": self.policy.tls_required,
            "tls_possible": self.tls_possible,
            "ipauthmap": list(self.routes),
        }


def describe_client(config: Config, chain: Chain, client: identity.ClientIdentity) -> ClientView:
    from ofmipd.assemble import build_rules
    from ofmipd.policy import decide

    # A client connecting from --remote-ip through a --tls-in-front terminator there has
    # an encrypted channel; then require-tls is already met.
    if config.tls_in_front:
        terminators = identity.Networks.parse(config.tls_in_front, option="--tls-in-front")
        client = identity.with_tls_in_front(
            client.with_changes(peer_ip=client.peer_ip or client.ip), terminators, ip_peer=True
        )
    policy = decide(client, config.tls, build_rules(config))
    tls_possible = bool(config.tls or config.ssl or client.tls_in_front)
    return ClientView(client, policy, tls_possible, tuple(ipauthmap_routes(chain, client)))


def ipauthmap_routes(chain: Chain, client: identity.ClientIdentity) -> list[str]:
    """For IMAP/POP3 backends with host 0.0.0.0: the server the map picks for local_ip."""
    routes = []
    for backend in chain.backends:
        server = getattr(backend, "server", None)  # auth_backends.remote.RemoteServer
        ipauthmap = getattr(server, "ipauthmap", None)
        if server is None or ipauthmap is None:
            continue
        local = client.local_ip or "(unknown)"
        try:
            host, port = server.destination(client)
        except ConfigError as error:
            routes.append(f"{backend.name}: {error}")
            continue
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        routes.append(f"{backend.name} ipauthmap {ipauthmap.path}: local {local} -> {where}")
    return routes


async def authenticate(
    chain: Chain,
    user: bytes,
    password: bytes,
    client: identity.ClientIdentity,
    try_all: bool,
    mechanism: str = "PLAIN",
) -> Decision:
    try:
        if mechanism.startswith("SCRAM-"):
            return await scram_exchange(chain, mechanism, user, password, client)
        return await chain.authenticate(user, password, client, try_all=try_all)
    finally:
        await close_backends(chain)


async def scram_exchange(
    chain: Chain, mechanism: str, user: bytes, password: bytes, client: identity.ClientIdentity
) -> Decision:
    """The chain's decision on a SCRAM login, with scramp's client in place of the remote one."""
    from collections.abc import Sequence

    from scramp import ScramClient
    from scramp.utils import ScramException

    from ofmipd.auth import Outcome, ScramKeys
    from ofmipd.scram import ScramExchange

    name = user.decode("utf-8", "replace")
    scram_client = ScramClient([mechanism], name, password.decode("utf-8", "replace"))
    exchange = ScramExchange(mechanism, scram_client.get_client_first(), name, None, True)

    async def ask(server_first: bytes) -> bytes:
        try:
            scram_client.set_server_first(server_first.decode())
            return scram_client.get_client_final().encode()
        except ScramException:  # e.g. an iteration count scramp's client will not use
            return b"c=biws,r=x,p=eA=="  # answered, and refused by the server side

    async def prove(candidates: Sequence[ScramKeys]) -> tuple[Outcome, ScramKeys | None]:
        return await exchange.prove(candidates, ask)

    return await chain.authenticate_scram(user, exchange.mechanism, client, prove)


async def close_backends(chain: Chain) -> None:
    for backend in chain.backends:
        close = getattr(backend, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):  # the verdict is made; cleanup is best effort
                await close()


def overall(decision: Decision, view: ClientView) -> tuple[Verdict, str, str]:
    """The answer to "can this user log in from there?", why, and what the client hears."""
    from ofmipd.replies import REPLY_AUTH_BAD, REPLY_AUTH_OK, REPLY_AUTH_TEMP, REPLY_NEED_TLS

    if view.policy.deny:
        why = f"client refused at connect; credentials: {decision.verdict.value}"
        return Verdict.REJECT, why, view.policy.deny_message
    if view.policy.tls_required and not view.tls_possible:
        why = f"AUTH needs TLS but no TLS is configured; credentials: {decision.verdict.value}"
        return Verdict.REJECT, why, REPLY_NEED_TLS
    decider = decision.decided_by
    if decision.verdict is Verdict.ACCEPT and decider is not None:
        return Verdict.ACCEPT, f"accepted by {decider.backend}", REPLY_AUTH_OK
    if decision.verdict is Verdict.TEMPFAIL:
        failed = [a.backend for a in decision.attempts if a.outcome.verdict is Verdict.TEMPFAIL]
        why = f"temporary failure of {', '.join(failed)}; the client should retry"
        return Verdict.TEMPFAIL, why, REPLY_AUTH_TEMP
    return Verdict.REJECT, "no backend accepted", REPLY_AUTH_BAD


def result_dict(decision: Decision, view: ClientView, total_ms: float) -> dict[str, Any]:
    verdict, why, reply = overall(decision, view)
    decider = decision.decided_by
    return {
        "user": decision.user,
        "decided_by": decider.backend if decider else None,
        "client": view.as_dict(),
        "attempts": [
            {
                "backend": a.backend,
                "target": a.target,
                "verdict": a.outcome.verdict.value,
                "reason": a.outcome.reason,
                "ms": round(a.ms, 1),
            }
            for a in decision.attempts
        ],
        "credentials": decision.verdict.value,
        "verdict": verdict.value,
        "why": why,
        "smtp_reply": reply,
        "exit": EXIT[verdict],
        "ms": round(total_ms, 1),
    }


def render_text(result: dict[str, Any]) -> str:
    client = result["client"]
    where = client["remote_ip"] + (f" to {client['local_ip']}" if client["local_ip"] else "")
    view_notes = []
    if client["deny"]:
        view_notes.append(f"denied at connect: {client['deny_message']}")
    if client["relay"]:
        view_notes.append("may relay without AUTH")
    if client["tls_required"]:
        view_notes.append(
            "AUTH only after STARTTLS" + ("" if client["tls_possible"] else " (no TLS!)")
        )
    rule = client["rule"] if client["rule"] != "default" else "no host rules configured"
    lines = [f"client {where}: {rule}" + (f": {', '.join(view_notes)}" if view_notes else "")]
    lines += client["ipauthmap"]  # where the remote IMAP/POP3 check goes for this client
    for a in result["attempts"]:
        lines.append(
            f"{a['backend']} {a['target']}: {a['verdict']} ({a['reason']}) {a['ms']:.1f} ms"
        )
    lines.append(f"client hears: {result['smtp_reply']}")
    lines.append(
        f"result: {result['verdict']} for user {result['user'] or '-'}: {result['why']}"
        f" ({result['ms']:.1f} ms)"
    )
    return "\n".join(lines)


def read_fd3() -> bytes | None:
    """checkpassword's input: up to 512 bytes from fd 3 until EOF; None if fd 3 is not open."""
    data = b""
    try:
        while len(data) <= MAX_CHECKPASSWORD_DATA:
            chunk = os.read(3, MAX_CHECKPASSWORD_DATA + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError:
        return None
    finally:
        with contextlib.suppress(OSError):
            os.close(3)
    return data


def checkpassword(chain: Chain, prog: list[str], setuid: bool = True) -> int:
    """The DJB interface: credentials on fd 3; exit 1 reject, 111 temporary failure, 2 misuse.

    Nothing goes to stdout: under qmail-popup it is the client's connection.
    """
    data = read_fd3()
    if data is None:
        print("ofmipd-authtest: --checkpassword: nothing to read on fd 3", file=sys.stderr)
        return 2
    parts = data.split(b"\0")
    if len(data) > MAX_CHECKPASSWORD_DATA or len(parts) < 3:
        print("ofmipd-authtest: --checkpassword: expected user\\0password\\0 on fd 3",
              file=sys.stderr)  # fmt: skip
        return 2
    user, password = parts[0], parts[1]
    # The consumer (ofmipd, qmail-popup, Dovecot) describes the client in TCPREMOTEIP & co.
    client = identity.from_environment(os.environ, identity.ClientIdentity(ip=""))
    decision = asyncio.run(authenticate(chain, user, password, client, try_all=False))
    del password, data, parts
    attempt = decision.decided_by
    # One line for the consumer's log (Dovecot logs stderr as errors, so not on success);
    # the name and the reason (which can embed it) come from the client: escaped.
    if attempt is not None and decision.verdict is not Verdict.ACCEPT:
        name = printable(decision.user if decision.user is not None else user) or "-"
        reason = printable(attempt.outcome.reason)
        print(f"ofmipd-authtest: {name}: {decision.verdict.value} "
              f"({attempt.backend}: {reason})", file=sys.stderr)  # fmt: skip
    if decision.verdict is not Verdict.ACCEPT:
        return EXIT[decision.verdict]
    if not prog:
        return 0
    name = decision.user or user.decode()  # the store's canonical name, not the typed one
    if not setuid:
        os.environ["USER"] = name
    else:
        failed = become(name)
        if failed:
            return failed
    try:
        os.execvp(prog[0], prog)  # noqa: S606 - the checkpassword interface execs PROG
    except OSError as error:
        print(f"ofmipd-authtest: cannot run {prog[0]}: {error.strerror}", file=sys.stderr)
        return 111
    return 111  # not reached


def become(name: str) -> int:
    """Set the process up for `name` as DJB's checkpassword does before it execs PROG.

    Its supplementary groups, gid and uid from the passwd database, then (as the user, so
    a home it cannot enter fails here) chdir to the home directory; $USER, $HOME and
    $SHELL, as checkpassword, checkpassword-pam and checkpw set them (none sets $LOGNAME).
    0 when done, else the exit code, with the reason on stderr: 1 for a user the passwd
    database does not know (there is no one to become), 111 for what the admin must fix.
    """
    import pwd

    shown = printable(name) or "-"
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        complain(f"{shown}: accepted, but not in the passwd database: PROG not run "
                 "(--checkpassword-no-setuid runs it without a system user)")  # fmt: skip
        return 1
    if os.geteuid() == 0:
        try:
            os.initgroups(entry.pw_name, entry.pw_gid)
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
        except OSError as error:
            complain(f"{shown}: cannot switch to uid {entry.pw_uid}: {error.strerror}")
            return 111
    elif entry.pw_uid != os.getuid():
        # Only root can become another user: a daemon not running as root can serve its
        # own user alone. A temporary failure, not a wrong password: the admin must fix it.
        complain(f"{shown}: cannot switch to uid {entry.pw_uid} as uid {os.getuid()}: "
                 "run as root, or give --checkpassword-no-setuid")  # fmt: skip
        return 111
    try:
        os.chdir(entry.pw_dir)
    except OSError as error:  # DJB's checkpassword: exit 111
        complain(f"{shown}: cannot change to home directory {printable(entry.pw_dir)}: "
                 f"{error.strerror}")  # fmt: skip
        return 111
    os.environ.update(USER=entry.pw_name, HOME=entry.pw_dir, SHELL=entry.pw_shell)
    return 0


def complain(message: str) -> None:
    print(f"ofmipd-authtest: {message}", file=sys.stderr)


def quota_usage(config: Config, user: str) -> int:
    """--quota USER: what the server's store holds for USER's quotas."""
    from ofmipd.assemble import build_quotas
    from ofmipd.store import StoreDown

    try:
        quotas = build_quotas(config, None)
    except ConfigError as error:
        print(f"ofmipd-authtest: {error}", file=sys.stderr)
        return 2
    mine = [q for q in (quotas.quotas if quotas else ()) if q.who == "user"]
    if quotas is None or not mine:
        print("no user quotas configured (--quota user-messages:... or [[quota]])")
        return 0
    try:
        found = asyncio.run(quotas.usage(user))
    except StoreDown as error:
        print(f"ofmipd-authtest: quota store unavailable: {printable(error)}", file=sys.stderr)
        return 111
    print(f"quotas for {printable(user)} ({quotas.store.describe()}):")
    for usage in found:
        left = max(0, usage.quota.limit - usage.used)
        if usage.resets_in is None:
            window = "no window open"
        else:
            at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + usage.resets_in))
            window = f"resets in {usage.resets_in:.0f}s ({at})"
        print(f"  {usage.quota}: {usage.used} used, {left} left, {window}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Messages logged while building the chain wait: a ConfigError replaces them all, so a
    # bad configuration stays one line (as in ofmipd's own start-up).
    root = logging.getLogger()
    early = logging.handlers.MemoryHandler(capacity=10000, flushLevel=logging.CRITICAL + 1)
    root.addHandler(early)
    root.setLevel(logging.WARNING)
    try:
        config = load_config(args)
        from ofmipd.assemble import build_chain

        if args.quota is not None:
            if args.user or args.checkpassword is not None:
                raise ConfigError("--quota USER takes no other user or --checkpassword")
        elif args.checkpassword_no_setuid and args.checkpassword is None:
            raise ConfigError("--checkpassword-no-setuid goes with --checkpassword")
        elif args.checkpassword is not None:
            if args.checkpassword[:1] == ["--checkpassword-no-setuid"]:
                raise ConfigError(
                    "give --checkpassword-no-setuid before --checkpassword: what follows "
                    "--checkpassword is PROG"
                )
            if args.user:
                raise ConfigError("--checkpassword reads the user from fd 3, not the arguments")
            chain = build_chain(config)
        else:
            if not args.user:
                raise ConfigError("which user? give the login name as the last argument")
            chain = build_chain(config)
            view = describe_client(config, chain, client_from_args(args))
    except ConfigError as error:
        print(f"ofmipd-authtest: {error}", file=sys.stderr)
        return 2
    finally:
        root.removeHandler(early)
    # Backends log to "ofmipd.*": lines on stderr, never on stdout (--json; checkpassword's
    # stdout may be the client's connection).
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logs.RedactingFormatter("ofmipd-authtest: %(message)s"))
    root.addHandler(handler)
    for record in early.buffer:
        handler.handle(record)
    if args.quota is not None:
        return quota_usage(config, args.quota)
    if args.checkpassword is not None:
        return checkpassword(chain, args.checkpassword, setuid=not args.checkpassword_no_setuid)
    try:
        password = read_password()
    except ConfigError as error:
        print(f"ofmipd-authtest: {error}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    decision = asyncio.run(
        authenticate(chain, args.user.encode(), password, view.client, args.all, args.mechanism)
    )
    del password
    result = result_dict(decision, view, (time.perf_counter() - started) * 1000)
    # Targets and reasons carry no passwords; the net is for a URL one of them quotes.
    print(logs.redact_url(json.dumps(result, indent=2) if args.json else render_text(result)))
    return int(result["exit"])


if __name__ == "__main__":
    sys.exit(main())
