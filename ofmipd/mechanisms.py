"""SASL mechanisms PLAIN, LOGIN, CRAM-MD5 and SCRAM's first message as pure functions
(no I/O; a fuzz target).

The SMTP layer sends the challenges and reads the responses; these functions only
decode what the client sent into credentials, or say why they cannot.
"""

from __future__ import annotations

import binascii
import os
import re
import time
from base64 import b64decode
from typing import NamedTuple

# The conventional challenges (Outlook, Thunderbird and swaks expect exactly these).
LOGIN_USERNAME_CHALLENGE = b"Username:"
LOGIN_PASSWORD_CHALLENGE = b"Password:"


class MalformedResponse(ValueError):
    """The client's response cannot be decoded; the text is an SMTP reply."""


class PlainCredentials(NamedTuple):
    user: bytes
    password: bytes


class CramResponse(NamedTuple):
    user: bytes
    digest: str  # lower-case hex


def decode_base64(text: bytes) -> bytes:
    """RFC 4954: '=' stands for an empty initial response."""
    text = text.strip()
    if text == b"=":
        return b""
    try:
        return b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedResponse("501 5.5.2 Cannot decode base64 response") from None


def parse_plain(message: bytes) -> PlainCredentials:
    """RFC 4616: [authzid] NUL authcid NUL passwd."""
    # A NUL inside the password stays in it, so the door check refuses it with 535.
    parts = message.split(b"\0", 2)
    if len(parts) != 3:
        raise MalformedResponse("501 5.5.2 Malformed PLAIN response")
    authzid, user, password = parts
    if authzid and authzid != user:
        # Acting as another user (proxy authorisation) is not offered.
        raise MalformedResponse("535 5.7.8 Authorization identity differs from login name")
    return PlainCredentials(user, password)


# A pattern, not a compiled regex: re compiles it (once) at the first CRAM-MD5 login,
# not in every process start.
_CRAM = rb"^(.+) ([0-9a-fA-F]{32})$"


def parse_cram_md5(message: bytes) -> CramResponse:
    """RFC 2195: user SP 32 hex digits."""
    match = re.match(_CRAM, message, re.DOTALL)
    if not match:
        raise MalformedResponse("501 5.5.2 Malformed CRAM-MD5 response")
    return CramResponse(match.group(1), match.group(2).decode("ascii").lower())


def cram_md5_challenge(hostname: str) -> bytes:
    """A unique msg-id-like challenge, as RFC 2195 describes."""
    return f"<{int.from_bytes(os.urandom(8), 'big')}.{int(time.time())}@{hostname}>".encode()


class ScramFirst(NamedTuple):
    user: bytes  # the name, unescaped, for the door and the stores
    message: str  # the whole client-first message, for scramp


def parse_scram_first(message: bytes) -> ScramFirst:
    """RFC 5802: gs2-header client-first-message-bare, the bare part starting "n=user,".
    Only the name is taken out here (the stores need it before the exchange goes on);
    scramp checks the rest."""
    try:
        text = message.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedResponse("501 5.5.2 Malformed SCRAM client-first message") from None
    parts = text.split(",", 3)
    if len(parts) != 4 or not parts[2].startswith("n="):
        raise MalformedResponse("501 5.5.2 Malformed SCRAM client-first message")
    user = parts[2][2:]
    if "=" in user.replace("=2C", "").replace("=3D", ""):
        raise MalformedResponse("501 5.5.2 Malformed SCRAM user name")
    return ScramFirst(user.replace("=2C", ",").replace("=3D", "=").encode("utf-8"), text)
