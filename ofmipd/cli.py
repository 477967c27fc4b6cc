"""The `ofmipd` command: flags (tmda-ofmipd's, plus new ones) to Config, and exit codes.

Exit 0 on a clean stop, 2 with one line on stderr for any configuration error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, NoReturn

from ofmipd import __version__, logs
from ofmipd.config import (
    SETTINGS,
    Config,
    Setting,
    from_flags,
    load_toml,
    merge,
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
    stdout = sys.__stdout__  # None when Python started without one
    if columns <= 0 and stdout is not None:
        try:
            columns = os.get_terminal_size(stdout.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter with the width given: argparse makes one for every parser (and
    checks each add_argument with one), and would import shutil, ~3 ms of every start-up,
    to learn the terminal width even when no help is printed."""

    def __init__(self, prog: str, **kwargs: Any) -> None:
        if "width" not in kwargs:  # not setdefault: that would ask the terminal every time
            kwargs["width"] = terminal_width() - 2  # what argparse itself subtracts
        super().__init__(prog, **kwargs)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2 like every other config error."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The terminal is asked once per parser, not for each formatter argparse makes
        # (one per add_argument on the parser itself, ~4 us each).
        width = terminal_width() - 2
        kwargs.setdefault("formatter_class", lambda prog: HelpFormatter(prog, width=width))
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
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
    groups: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.flags:
            if setting.group not in groups:
                groups[setting.group] = parser.add_argument_group(setting.group)
            add_setting(groups[setting.group], setting)
    add_auth_options(parser)
    tmda = parser.add_argument_group("accepted for tmda-ofmipd compatibility, no effect")
    tmda.add_argument("-c", "--configdir", help=argparse.SUPPRESS)
    tmda.add_argument("-P", "--pure-proxy", action="store_true", help=argparse.SUPPRESS)
    tmda.add_argument("-S", "--vhome-script", help=argparse.SUPPRESS)
    tmda.add_argument("-v", "--vdomains-path", help=argparse.SUPPRESS)
    return parser


def add_setting(group: Any, setting: Setting) -> None:
    """One flag from its declaration. A flag not given is None, so TOML's value stands."""
    if setting.value_type is bool:
        const = True if setting.const is None else setting.const
        group.add_argument(
            *setting.flags, dest=setting.dest, action="store_const", const=const, help=setting.help
        )
        return
    options: dict[str, Any] = {"metavar": setting.metavar, "choices": setting.choices}
    if setting.value_type is not str:
        options["type"] = setting.value_type
    if setting.repeat:
        options["action"] = "append"
    if setting.const is not None:  # --tls-in-front alone
        options.update(nargs="?", const=setting.const)
    group.add_argument(*setting.flags, dest=setting.dest, help=setting.help, **options)


def auth_specs(args: argparse.Namespace) -> tuple[Any, ...]:
    from auth_backends import spec_from_flag

    return tuple(spec_from_flag(kind, value) for kind, value in args.auth_flags)


def config_from_args(args: argparse.Namespace) -> Config:
    base = load_toml(args.config) if args.config else Config()
    return validate(merge(base, {**from_flags(args), "auth": auth_specs(args)}))


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
    except Exception as error:  # noqa: BLE001 - any error here is the configuration's
        # A value no check foresaw (a NUL in a path, say, or a backend's own exception):
        # still one line and exit 2, as a reload would say it; --debug shows where it came from.
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
