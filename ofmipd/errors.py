"""The one exception that ends start-up with a one-line message and exit 2."""

from ofmipd.logs import redact_url


class ConfigError(Exception):
    """Bad configuration; str(error) is the single line the admin sees."""

    def __init__(self, message: str = "") -> None:
        # Every configuration message passes here on its way to stderr, a log line or
        # ofmipd-authtest: a URL a caller quoted in it (-R, Redis) loses its password.
        super().__init__(redact_url(str(message)))


def one_line(error: BaseException) -> str:
    """An exception no check foresaw, as one line: its type and its message."""
    if isinstance(error, ConfigError):
        return str(error)
    return redact_url(" ".join(f"{type(error).__name__}: {error}".split()))
