"""What a backend says about itself, as twisted's ICheckerFactory: kind, flag, help, options.

One `Backend` per kind, in auth_backends/kinds/KIND.py. From it come the command-line
flags and `--help` (ofmipd.cli), the README's table (`python -m auth_backends --markdown`)
and the checking of a BackendSpec's options (`Backend.settings`), so that every backend
reports an unknown setting or a wrong type the same way. Plain classes, not NamedTuples:
every `ofmipd -1` imports these to build its command line, and the package that holds the
declarations is where they are defined, to spare each start-up one more module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ofmipd.errors import ConfigError

if TYPE_CHECKING:
    from ofmipd.config import BackendSpec

# Option types that are checked here; any other is a description for the docs, and the
# backend checks the value itself (a command line or argv, a list of URIs...).
TEXT = "text"
INTEGER = "integer"
SECONDS = "seconds"
BOOLEAN = "true/false"


class Option:
    """One setting of a backend: a TOML key, also a `?key=value` of a URL where it says so."""

    __slots__ = ("default", "help", "high", "in_url", "low", "name", "required", "type")

    def __init__(
        self,
        name: str,
        type: str,
        help: str,
        default: Any = None,
        *,
        low: float | None = None,
        high: float | None = None,
        required: str = "",  # the error when it is missing; "" means optional
        in_url: bool = False,  # may be given as the -R URL's ?name=value, as text
    ) -> None:
        self.name = name
        self.type = type
        self.help = help
        self.default = default
        self.low = low
        self.high = high
        self.required = required
        self.in_url = in_url

    def check(self, value: Any) -> Any:
        if self.in_url and isinstance(value, str):
            value = self._from_text(value)
        if self.type == TEXT:
            # Empty is "not set" in a URL (?fallback=), and has always been in TOML too.
            if not isinstance(value, str) or not (value or self.in_url):
                raise ConfigError(self.required or f"{self.name} must be a non-empty string")
        elif self.type == BOOLEAN:
            if not isinstance(value, bool):
                raise ConfigError(f"{self.name} must be true or false, not {value!r}")
        elif self.type in (INTEGER, SECONDS):
            number = int if self.type == INTEGER else int | float
            if isinstance(value, bool) or not isinstance(value, number):
                raise ConfigError(self._range_text())
            if not self._in_range(value):
                raise ConfigError(self._range_text())
            return float(value) if self.type == SECONDS else value
        return value

    def _from_text(self, text: str) -> Any:
        """A URL's text as the option's type; left as it is when it does not convert."""
        if self.type == BOOLEAN:
            return {"1": True, "yes": True, "true": True, "on": True, "0": False, "no": False,
                    "false": False, "off": False}.get(text.lower(), text)  # fmt: skip
        if self.type == SECONDS:
            try:
                return float(text)
            except ValueError:
                return text
        return text

    def _in_range(self, value: float) -> bool:
        if self.type == SECONDS and value <= 0:
            return False
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)

    def _range_text(self) -> str:
        if self.type == INTEGER:
            return f"{self.name} must be a whole number from {self.low} to {self.high}"
        upto = f" up to {self.high:g}" if self.high is not None else ""
        return f"{self.name} must be a positive number of seconds{upto}"

    def describe(self) -> str:
        """`name` (type, default X): help, for --help and the README."""
        default = "" if self.default is None else f", default {self._shown(self.default)}"
        return f"`{self.name}` ({self.type}{default}): {self.help}"

    @staticmethod
    def _shown(value: Any) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, float):
            return f"{value:g}"
        return f'"{value}"' if isinstance(value, str) else str(value)  # as written in TOML


class Settings:
    """The options of one BackendSpec, checked: `settings[key]` falls back to the default,
    `key in settings` says whether it was given."""

    __slots__ = ("backend", "given", "where")

    def __init__(self, backend: Backend, given: dict[str, Any], where: str) -> None:
        self.backend = backend
        self.given = given
        self.where = where

    def __contains__(self, key: str) -> bool:
        return key in self.given

    def __getitem__(self, key: str) -> Any:
        if key in self.given:
            return self.given[key]
        return self.backend.option(key).default

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.where}: {message}")


class Backend:
    """A backend's declaration: everything about it that is not its implementation."""

    __slots__ = (
        "arg",
        "flags",
        "help",
        "kind",
        "metavar",
        "module",
        "needs",
        "options",
        "schemes",
        "url",
    )

    def __init__(
        self,
        kind: str,
        *,
        module: str,  # the implementation: a module with create(spec) -> Authenticator
        help: str,  # one line
        options: tuple[Option, ...] = (),
        flags: tuple[str, ...] = (),  # its own flag, e.g. ("-a", "--authfile")
        metavar: str = "",
        arg: str | None = None,  # the option the flag's value (or -R URL) sets
        schemes: tuple[str, ...] = (),  # -R URL schemes that choose this backend
        url: str = "",  # the -R URL's shape, for --help
        needs: str = "",  # a library that may be missing from the installation
    ) -> None:
        self.kind = kind
        self.module = module
        self.help = help
        self.options = options
        self.flags = flags
        self.metavar = metavar
        self.arg = arg
        self.schemes = schemes
        self.url = url
        self.needs = needs

    def option(self, name: str) -> Option:
        for option in self.options:
            if option.name == name:
                return option
        raise KeyError(name)

    def where(self, spec: BackendSpec) -> str:
        """How the admin wrote it, for the front of an error line."""
        if spec.arg is None:
            return f'[[auth]] kind="{self.kind}"'
        if self.schemes:
            from ofmipd.logs import redact_url

            return f"-R {redact_url(spec.arg)}"
        shown = f'"{spec.arg}"' if any(c.isspace() for c in spec.arg) else spec.arg
        return f"{self.flags[0]} {shown}"

    def settings(self, spec: BackendSpec) -> Settings:
        """Check the spec's options against the declaration; the flag's value fills `arg`."""
        where = self.where(spec)
        given: dict[str, Any] = dict(spec.options)
        if spec.arg is not None and self.arg is not None:
            given[self.arg] = spec.arg
        names = {option.name for option in self.options}
        unknown = sorted(set(given) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown setting {unknown[0]!r}")
        if isinstance(given.get("url"), str):
            self._add_query(given, where)
        for option in self.options:
            try:
                if option.name in given:
                    given[option.name] = option.check(given[option.name])
                elif option.required:
                    raise ConfigError(option.required)
            except ConfigError as error:
                raise ConfigError(f"{where}: {error}") from None
        return Settings(self, given, where)

    def _add_query(self, given: dict[str, Any], where: str) -> None:
        """A URL's ?name=value options; a table's own setting of the same name wins."""
        from urllib.parse import parse_qsl, urlsplit

        try:
            query = urlsplit(given["url"]).query
        except ValueError:
            return  # the backend reports the malformed URL, with its own words
        in_url = {option.name for option in self.options if option.in_url}
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key not in in_url:
                raise ConfigError(f"{where}: unknown option {key!r}")
            given.setdefault(key, value)

    def markdown_row(self) -> str:
        """flag | kind | help | options: one row of the README's table."""
        flag = f"`{self.flags[0]} {self.metavar}`" if self.flags else f"`-R {self.url}`"
        options = "<br>".join(option.describe() for option in self.options)
        cells = (flag, f"`{self.kind}`", self.help, options)
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"
