"""`ofmipd-authtest`: why can (or can't) this user log in, with this configuration?

It builds the authenticator chain through the same code as the server
(assemble.build_chain), asks it as the server would, and prints each backend's
answer. Exit 0 accepted, 1 rejected, 111 temporary failure, 2 usage or
configuration error. With --checkpassword it is itself a DJB checkpassword
program backed by the ofmipd configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

from ofmipd import identity
from ofmipd.auth import Decision, Verdict
from ofmipd.cli import Parser, add_auth_options, auth_specs
from ofmipd.config import Config, load_toml, merge
from ofmipd.errors import ConfigError

EXIT = {Verdict.ACCEPT: 0, Verdict.REJECT: 1, Verdict.TEMPFAIL: 111}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="ofmipd-authtest",
        description="Test a user's credentials against ofmipd's authenticators. The password "
        "is read from the first line of stdin, or prompted for without echo on a terminal.",
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
    parser.add_argument("--rules", metavar="FILE", help="host rules to show for --remote-ip")
    parser.add_argument(
        "--tls",
        choices=("optional", "localoptional", "on"),
        help="the TLS mode to assume when showing what the client may do",
    )
    parser.add_argument(
        "--all", action="store_true", help="try every backend, not just until the first accept"
    )
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument(
        "--checkpassword",
        nargs=argparse.REMAINDER,
        metavar="PROG",
        help="act as a checkpassword program: read user\\0password\\0 from fd 3, "
        "exec PROG with $USER set on success",
    )
    parser.add_argument("user", nargs="?", help="the login name to test")
    return parser


def load_config(args: argparse.Namespace) -> Config:
    base = load_toml(args.config) if args.config else Config()
    config = merge(base, {"auth": auth_specs(args), "rules": args.rules, "tls": args.tls})
    if not config.auth:
        raise ConfigError(
            "no authenticator configured: give -a, --htpasswd, -A, -m, -R or --config"
        )
    return config


def read_password() -> bytes:
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass("Password: ").encode()
    line = sys.stdin.buffer.readline()
    return line.rstrip(b"\r\n")


def describe_policy(config: Config, client: identity.ClientIdentity) -> dict[str, Any]:
    from ofmipd.assemble import build_rules
    from ofmipd.policy import decide

    policy = decide(client, config.tls, build_rules(config))
    return {
        "rule": policy.rule,
        "deny": policy.deny,
        "relay": policy.relay,
        "tls_required": policy.tls_required,
    }


def report(decision: Decision, policy: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps(
            {
                "user": decision.user,
                "verdict": decision.verdict.value,
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
                "client": policy,
            },
            indent=2,
        )
    lines = []
    for a in decision.attempts:
        lines.append(
            f"{a.backend} {a.target}: {a.outcome.verdict.value} ({a.outcome.reason}) {a.ms:.1f} ms"
        )
    what = []
    if policy["deny"]:
        what.append("denied at connect")
    if policy["relay"]:
        what.append("may relay without AUTH")
    if policy["tls_required"]:
        what.append("AUTH only after STARTTLS")
    lines.append(f"client rule: {policy['rule']}" + (f" ({', '.join(what)})" if what else ""))
    lines.append(f"result: {decision.verdict.value} for user {decision.user or '-'}")
    return "\n".join(lines)


def checkpassword(config: Config, prog: list[str]) -> int:
    """The DJB interface: credentials on fd 3; exit 1 reject, 111 temporary failure."""
    from ofmipd.assemble import build_chain

    try:
        with os.fdopen(3, "rb") as fd3:
            data = fd3.read(4096)
    except OSError:
        return 2
    parts = data.split(b"\0")
    if len(parts) < 3:
        return 2
    user, password = parts[0], parts[1]
    client = identity.from_environment(os.environ, identity.ClientIdentity(ip=""))
    decision = asyncio.run(build_chain(config).authenticate(user, password, client))
    if decision.verdict is not Verdict.ACCEPT:
        return EXIT[decision.verdict]
    if not prog:
        return 0
    os.environ["USER"] = decision.user or user.decode()
    try:
        os.execvp(prog[0], prog)  # noqa: S606 - the checkpassword interface execs PROG
    except OSError:
        return 111
    return 111  # not reached


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args)
        if args.checkpassword is not None:
            return checkpassword(config, args.checkpassword)
        if not args.user:
            raise ConfigError("which user? give the login name as the last argument")
        from ofmipd.assemble import build_chain

        chain = build_chain(config)
        client = identity.ClientIdentity(
            ip=identity.normalise_ip(args.remote_ip),
            local_ip=identity.normalise_ip(args.local_ip),
            source="authtest",
        )
        policy = describe_policy(config, client)
    except ConfigError as error:
        print(f"ofmipd-authtest: {error}", file=sys.stderr)
        return 2
    password = read_password()
    started = time.perf_counter()
    decision = asyncio.run(
        chain.authenticate(args.user.encode(), password, client, try_all=args.all)
    )
    del password
    print(report(decision, policy, args.json))
    if not args.json:
        print(f"total: {(time.perf_counter() - started) * 1000:.1f} ms")
    return EXIT[decision.verdict]


if __name__ == "__main__":
    sys.exit(main())
