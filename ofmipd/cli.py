"""The `ofmipd` command: flags (tmda-ofmipd's, plus new ones) to Config, and exit codes.

Exit 0 on a clean stop, 2 with one line on stderr for any configuration error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from ofmipd import __version__, logs
from ofmipd.config import (
    LOOPBACK,
    Config,
    load_toml,
    merge,
    parse_listen,
    tls_in_front_list,
    validate,
)
from ofmipd.errors import ConfigError, one_line

# tmda-ofmipd options that concern TMDA's address tagging, which ofmipd does not do.
TMDA_ONLY = {"configdir", "pure_proxy", "vhome_script", "vdomains_path", "fallback"}


def terminal_width() -> int:
    """shutil.get_terminal_size().columns, without importing shutil (and bz2, lzma with it)."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter with the width given: argparse makes one for every parser (and
    checks each add_argument with one), and would import shutil, ~3 ms of every start-up,
    to learn the terminal width even when no help is printed."""

    def __init__(self, prog: str, **kwargs: Any) -> None:
        kwargs.setdefault("width", terminal_width() - 2)  # what argparse itself subtracts
        super().__init__(prog, **kwargs)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2 like every other config error."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


class _AuthFlag(argparse.Action):
    """Collects every authenticator flag into one list, in command-line order."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        flags = list(getattr(namespace, "auth_flags", None) or [])
        flags.append((self.dest, values))
        namespace.auth_flags = flags


def add_auth_options(parser: argparse.ArgumentParser) -> None:
    """Authenticator and config options, shared with ofmipd-authtest: one flag per backend
    that has one, and -R for those chosen by a URL scheme, all from their declarations."""
    from auth_backends import all_declared

    group = parser.add_argument_group("authentication (tried in the order given)")
    urls = []
    for backend in all_declared():
        if backend.flags:
            group.add_argument(
                *backend.flags,
                dest=backend.kind,
                action=_AuthFlag,
                metavar=backend.metavar,
                help=backend.help.replace("%", "%%"),
            )
        if backend.url:
            urls.append(backend.url)
    group.add_argument(
        "-R",
        "--remoteauth",
        dest="remoteauth",
        action=_AuthFlag,
        metavar="URL",
        help=", ".join(urls).replace("%", "%%"),
    )
    group.add_argument(
        "-F",
        "--fallback",
        action="store_true",
        help="accepted for tmda-ofmipd compatibility; every backend is a fallback",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML configuration (flags win)")
    parser.set_defaults(auth_flags=[])


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="ofmipd",
        description="Authenticated SMTP submission front-end (successor of tmda-ofmipd).",
    )
    parser.add_argument("--version", action="version", version=f"ofmipd {__version__}")
    parser.add_argument("-V", action="version", version=f"ofmipd {__version__}")
    general = parser.add_argument_group("general")
    general.add_argument(
        "-d",
        "--debug",
        action="store_true",
        default=None,
        help="protocol trace (AUTH payloads and passwords redacted)",
    )
    general.add_argument(
        "-L",
        "--log",
        action="store_true",
        default=None,
        help="log sessions and authentications to stderr",
    )
    general.add_argument("--syslog", action="store_true", default=None, help="log to syslog")
    general.add_argument(
        "-b",
        "--background",
        action="store_true",
        default=None,
        help="detach and run in the background",
    )
    general.add_argument(
        "-f", "--foreground", action="store_true", help="stay in the foreground (the default)"
    )
    general.add_argument(
        "-u", "--username", metavar="USER", help="drop privileges to USER after binding"
    )
    general.add_argument(
        "--hostname",
        metavar="FQDN",
        help="name in the banner and Received header (default: this host's FQDN)",
    )
    general.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration, print it, exit 0 or 2",
    )
    conn = parser.add_argument_group("connections")
    conn.add_argument(
        "-p",
        "--proxyport",
        action="append",
        metavar="HOST:PORT",
        default=[],
        help="listen here (repeatable; default 127.0.0.1:8025)",
    )
    conn.add_argument(
        "-6",
        "--ipv6proxyport",
        action="append",
        metavar="HOST:PORT",
        default=[],
        help="listen on an IPv6 address (repeatable), e.g. [::1]:8025",
    )
    conn.add_argument(
        "-C",
        "--connections",
        type=int,
        metavar="N",
        help="simultaneous sessions (default 100); more clients wait",
    )
    conn.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="N processes share the listening sockets (default 1); -C applies per worker",
    )
    conn.add_argument(
        "-1",
        "--one-session",
        action="store_true",
        default=None,
        help="one SMTP session on stdin/stdout (inetd, tcpserver, stunnel, systemd)",
    )
    conn.add_argument("--rules", metavar="FILE", help="host-based access rules")
    conn.add_argument(
        "--proxy-protocol",
        metavar="CIDR[,CIDR...]",
        help="expect a PROXY v1/v2 header from these peers",
    )
    conn.add_argument(
        "--tls-in-front",
        nargs="?",
        const=",".join(LOOPBACK),
        metavar="CIDR[,CIDR...]",
        help="a TLS terminator (stunnel, haproxy) at these peers already encrypts the "
        "channel (no list: loopback; one-session mode also trusts a socketpair or pipes)",
    )
    tls = parser.add_argument_group("TLS")
    tls.add_argument(
        "--ssl",
        action="store_true",
        default=None,
        help="implicit TLS from the first byte (port 465)",
    )
    tls.add_argument(
        "--tls",
        metavar="MODE",
        choices=("optional", "localoptional", "on"),
        help="offer STARTTLS: optional, localoptional or on",
    )
    tls.add_argument("--ssl-cert", metavar="FILE", help="PEM certificate (chain; may hold the key)")
    tls.add_argument("--ssl-key", metavar="FILE", help="PEM private key")
    tls.add_argument("--ciphers", metavar="LIST", help="OpenSSL cipher list for TLS 1.2")
    delivery = parser.add_argument_group("delivery")
    delivery.add_argument(
        "--sendmail",
        metavar="PROGRAM",
        help="injector (default $OFMIPD_SENDMAIL, $TMDA_SENDMAIL_PROGRAM, /usr/sbin/sendmail)",
    )
    delivery.add_argument("--maildir", metavar="DIR", help="deliver into this Maildir instead")
    delivery.add_argument(
        "-t",
        "--throttle-script",
        metavar="PATH",
        help="run with the user name before delivery; non-zero exit refuses",
    )
    limits = parser.add_argument_group("limits and abuse resistance")
    limits.add_argument(
        "--size-limit",
        type=int,
        metavar="BYTES",
        help="largest message (default 35 MiB; SIZE is advertised)",
    )
    limits.add_argument(
        "--max-recipients", type=int, metavar="N", help="recipients per message (default 100)"
    )
    limits.add_argument(
        "--max-errors",
        type=int,
        metavar="N",
        help="error replies before 421 and close (default 20)",
    )
    limits.add_argument(
        "--max-commands",
        type=int,
        metavar="N",
        help="uses of one command per session (default 1000)",
    )
    limits.add_argument(
        "--max-per-ip",
        type=int,
        metavar="N",
        help="simultaneous sessions from one client address (default 10, or -C/4 if smaller)",
    )
    limits.add_argument(
        "--idle-timeout",
        type=float,
        metavar="SECONDS",
        help="wait for a command at most this long (default 300)",
    )
    limits.add_argument(
        "--ehlo-timeout",
        type=float,
        metavar="SECONDS",
        help="time from connect to EHLO/HELO, including a PROXY header and the implicit "
        "TLS handshake; NOOPs do not extend it (default 20)",
    )
    limits.add_argument(
        "--data-timeout",
        type=float,
        metavar="SECONDS",
        help="time allowed for a whole DATA transfer (default 600)",
    )
    limits.add_argument(
        "--delivery-timeout",
        type=float,
        metavar="SECONDS",
        help="time allowed for the injector and throttle script (default 300)",
    )
    limits.add_argument(
        "--auth-timeout",
        type=float,
        metavar="SECONDS",
        help="time allowed for each authenticator (default 30)",
    )
    limits.add_argument(
        "--sender-map",
        metavar="FILE",
        help="user -> allowed envelope senders; others get 553 5.7.1",
    )
    limits.add_argument(
        "--ratelimit",
        metavar="sqlite|memory|redis://HOST:PORT/DB|off",
        help="where failed logins are counted, per client and per user (default sqlite, "
        "in --state-dir; memory: one daemon only); off turns guessing limits off",
    )
    limits.add_argument(
        "--ratelimit-fail-closed",
        action="store_true",
        default=None,
        help="refuse logins while the rate-limit store cannot be used (default: fall "
        "back to a limit in process memory)",
    )
    limits.add_argument(
        "--state-dir",
        metavar="DIR",
        help="directory for the sqlite rate-limit store, made 0700 for the -u user "
        "(default $STATE_DIRECTORY, else /var/lib/ofmipd)",
    )
    limits.add_argument(
        "--bare-newline",
        choices=("normalize", "reject"),
        help="a bare LF or CR in a message: take it as a line ending (normalize, the "
        "default) or refuse the message with 550 5.5.2",
    )
    limits.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics here")
    limits.add_argument(
        "--no-reverse-dns",
        action="store_true",
        default=None,
        help="do not look up client names for the Received header",
    )
    add_auth_options(parser)
    tmda = parser.add_argument_group("accepted for tmda-ofmipd compatibility, no effect")
    tmda.add_argument("-c", "--configdir", help=argparse.SUPPRESS)
    tmda.add_argument("-P", "--pure-proxy", action="store_true", help=argparse.SUPPRESS)
    tmda.add_argument("-S", "--vhome-script", help=argparse.SUPPRESS)
    tmda.add_argument("-v", "--vdomains-path", help=argparse.SUPPRESS)
    return parser


def auth_specs(args: argparse.Namespace) -> tuple[Any, ...]:
    from auth_backends import spec_from_flag

    return tuple(spec_from_flag(kind, value) for kind, value in args.auth_flags)


def config_from_args(args: argparse.Namespace) -> Config:
    base = load_toml(args.config) if args.config else Config()
    listen = tuple(parse_listen(x) for x in args.proxyport) + tuple(
        parse_listen(x, ipv6=True) for x in args.ipv6proxyport
    )
    proxies = tuple(x for x in (args.proxy_protocol or "").split(",") if x.strip())
    # Flags named like Config fields carry over as they are; None means "not given".
    flags = {name: getattr(args, name) for name in Config._fields if hasattr(args, name)}
    flags.update(
        listen=listen,
        auth=auth_specs(args),
        proxy_protocol=proxies,
        ratelimit_fail_open=False if args.ratelimit_fail_closed else None,
        reverse_dns=False if args.no_reverse_dns else None,
        tls_in_front=None if args.tls_in_front is None else tls_in_front_list(args.tls_in_front),
    )
    return validate(merge(base, flags))


def fail(message: str) -> int:
    print(f"ofmipd: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ignored = sorted(name for name in TMDA_ONLY if getattr(args, name, None))
    if ignored:
        print(
            f"ofmipd: note: tmda-ofmipd option(s) {', '.join(ignored)} have no effect here",
            file=sys.stderr,
        )
    # Start-up messages wait until logging is set up; a ConfigError replaces them all.
    early = logs.Buffer()
    logging.getLogger().addHandler(early)
    logging.getLogger().setLevel(logging.INFO)
    try:
        config = config_from_args(args)
        from ofmipd.assemble import build_app

        app = build_app(config)
    except ConfigError as error:
        return fail(str(error))
    except Exception as error:
        # A value no check foresaw (a NUL in a path, say): still one line and exit 2,
        # as a reload would say it; --debug shows where it came from.
        if args.debug:
            import traceback

            traceback.print_exc()
        return fail(f"cannot use this configuration: {one_line(error)}")
    finally:
        logging.getLogger().removeHandler(early)
    logs.replay_later(early.records)
    if args.check_config:
        from ofmipd.access import report

        try:
            privileges = report(app)
        except ConfigError as error:
            return fail(str(error))
        print(app.describe())
        print("\n".join(privileges))
        # What start-up would log as warnings (a readable config or password file).
        for record in early.records:
            if record.levelno >= logging.WARNING:
                print(f"warning: {logs.redact_url(record.getMessage())}")
        return 0
    if config.one_session:
        from ofmipd.stdio import exit_without_teardown, serve_one_session

        exit_without_teardown(serve_one_session(app))
    from ofmipd.listeners import serve_daemon

    return serve_daemon(app, config_loader=lambda: config_from_args(args))


if __name__ == "__main__":
    sys.exit(main())
