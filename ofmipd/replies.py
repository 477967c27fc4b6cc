"""The reply lines ofmipd sends itself, and the rewriting of aiosmtpd's own.

aiosmtpd's replies have no enhanced status code (RFC 2034 wants one on every 2xx, 4xx
and 5xx reply after EHLO), and a few say more than they should. The session passes
each line it sends through `rewrite` unless the line is already ofmipd's own.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Container

REPLY_AUTH_OK = "235 2.7.0 Authentication successful"
REPLY_AUTH_BAD = "535 5.7.8 Authentication credentials invalid"
REPLY_AUTH_TEMP = "454 4.7.0 Temporary authentication failure"
REPLY_NEED_TLS = "530 5.7.0 Must issue a STARTTLS command first"
REPLY_NEED_AUTH = "530 5.7.0 Authentication required"
REPLY_TOO_MANY = "454 4.7.0 Too many authentication failures, try again later"
REPLY_BUSY = "454 4.7.0 Too many authentications in progress, try again later"
REPLY_INTERNAL = "451 4.3.0 Internal error, try again later"

# The enhanced code that goes with each basic one, for aiosmtpd's replies that have none.
_DEFAULT_ENHANCED = {
    "221": "2.0.0",
    "235": "2.7.0",
    "250": "2.0.0",
    "252": "2.0.0",
    "421": "4.3.0",
    "450": "4.2.0",
    "451": "4.3.0",
    "452": "4.3.1",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "535": "5.7.8",
    "550": "5.7.1",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.7.0",
    "555": "5.5.4",
}


@functools.cache
def _has_enhanced() -> re.Pattern[str]:
    # Compiled on first use: not before a one-session banner.
    return re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")


# aiosmtpd's wording, replaced where RFC or habit has a clearer one.
_REWORDED = {
    "500 Command line too long": "500 5.5.2 Line too long",
    "552 Error: Too much mail data": "552 5.3.4 Message size exceeds fixed limit",
}


def reworded(status: str, commands: Container[str]) -> str:
    """aiosmtpd's `status` in ofmipd's words; `commands` are the ones the session knows."""
    # aiosmtpd echoes an unrecognised command, which may be a password's base64 sent for
    # a 334 challenge that never came: neither the reply nor the trace may show it.
    if status.startswith('500 Error: command "'):
        return "500 5.5.2 Error: command not recognized"
    if status.endswith(" sent too many times") and status[10:-20] not in commands:
        return "421 4.7.0 Command sent too many times"
    return _REWORDED.get(status, status)


def with_enhanced_code(line: str) -> str:
    extra = _DEFAULT_ENHANCED.get(line[:3])  # None for 220, 334, 354: they take no code
    if extra is None or len(line) < 4 or line[3] != " " or _has_enhanced().match(line):
        return line
    return f"{line[:3]} {extra} {line[4:]}"


def rewrite(status: str, commands: Container[str]) -> str:
    """What the client hears for aiosmtpd's `status`."""
    return with_enhanced_code(reworded(status, commands))
