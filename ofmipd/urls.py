"""Server URLs in the configuration (-R, [[auth]] uri/url, the Redis store): one line for
anything malformed, with the password hidden.

urlsplit raises ValueError for '[::1' and only when .port is read for ':x' or ':99999',
and its messages can quote the text after the last colon, which is the password when
"@host" was forgotten. Every site that takes a server URL goes through split_url.
"""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit

from ofmipd.errors import ConfigError
from ofmipd.logs import redact_url


def split_url(url: str, where: str) -> SplitResult:
    """urlsplit(url) with the brackets and the port checked; ConfigError("WHERE: ...") if not."""
    shown = redact_url(url)
    if shown not in where:  # a -R flag's `where` already quotes it
        where = f"{where}: {shown!r}"
    try:
        parts = urlsplit(url)
    except ValueError:  # "Invalid IPv6 URL": an unclosed or misplaced bracket
        raise ConfigError(f"{where}: unbalanced [ ] around the host") from None
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ConfigError(f"{where}: bad port (expected a number from 1 to 65535)")
    return parts
