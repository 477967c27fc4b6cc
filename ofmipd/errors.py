"""The one exception that ends start-up with a one-line message and exit 2."""


class ConfigError(Exception):
    """Bad configuration; str(error) is the single line the admin sees."""
