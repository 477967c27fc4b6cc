"""Remote IMAP login check (-R imap://HOST[:PORT] or imaps://): LOGIN answers the password.

IMAP answers (RFC 3501 §7.1, response codes RFC 5530):
  tagged OK                         -> ACCEPT
  tagged NO                         -> REJECT (wrong password, unknown user, expired...)
  NO [UNAVAILABLE] / [SERVERBUG] /
     [INUSE] / [LIMIT] / [PRIVACYREQUIRED]
                                    -> TEMPFAIL: the server could not check, or refuses
                                       plaintext; the password may well be right
  tagged BAD                        -> TEMPFAIL: BAD is about the command's syntax, never
                                       about the credentials, so it means a protocol
                                       mismatch that the admin must look at
  greeting BYE, PREAUTH, LOGINDISABLED, garbage, timeout, refused -> TEMPFAIL
"""

from __future__ import annotations

import re
from collections.abc import Collection

from auth_backends.client_address import client_address
from auth_backends.kinds import IMAP as BACKEND
from auth_backends.remote import Conversation, ProtocolError, RemoteServer, safe_text
from ofmipd.auth import Outcome, Secret, accept, reject, tempfail
from ofmipd.config import BackendSpec
from ofmipd.identity import ClientIdentity

SCHEMES = {"imap": (143, False), "imaps": (993, True)}
TEMPORARY_CODES = {"UNAVAILABLE", "SERVERBUG", "INUSE", "LIMIT", "PRIVACYREQUIRED"}
MAX_LITERAL = 65536
_TAGGED = re.compile(rb"^a1 (OK|NO|BAD)\b(?: \[([A-Za-z0-9-]+)[^\]]*\])?", re.IGNORECASE)
_LITERAL_AT_END = re.compile(rb"\{(\d+)\+?\}$")
_ID_DONE = re.compile(rb"^i0 (OK|NO|BAD)\b", re.IGNORECASE)
_CAPABILITY = re.compile(rb"\[CAPABILITY ([^\]]*)\]", re.IGNORECASE)


def astring(value: bytes) -> tuple[bytes, bytes | None]:
    """(text for the command line, literal bytes to send after a continuation or None).

    Printable ASCII without quote or backslash goes as a quoted string; anything else
    (UTF-8, '"', '\\', control characters) as a synchronising literal, which carries any
    byte except NUL, CR and LF without escaping rules to get wrong (RFC 3501 §4.3).
    """
    if all(32 <= c < 127 and c not in b'"\\' for c in value):
        return b'"' + value + b'"', None
    return b"{%d}" % len(value), value


async def _response(talk: Conversation) -> bytes:
    """One response line; literals inside untagged data are read and skipped."""
    line = await talk.line()
    # Only untagged data carries literals; a tagged line's text is free text (RFC 3501 §9).
    while line.startswith(b"* ") and (match := _LITERAL_AT_END.search(line)) is not None:
        size = int(match.group(1))
        if size > MAX_LITERAL:
            raise ProtocolError(f"IMAP literal of {size} bytes")
        await talk.reader.readexactly(size)
        line = line[: match.start()] + b'""' + await talk.line()
    return line


async def login(talk: Conversation, user: bytes, password: bytes) -> Outcome:
    greeting = await _response(talk)
    word = greeting[:10].upper()
    if word.startswith(b"* BYE"):
        return tempfail(f"IMAP server refused the connection: {safe_text(greeting[5:])}")
    if word.startswith(b"* PREAUTH"):
        return tempfail("IMAP server greeted PREAUTH, so it cannot check a password")
    if not word.startswith(b"* OK"):
        raise ProtocolError(f"not an IMAP greeting: {safe_text(greeting)!r}")
    capabilities = _CAPABILITY.search(greeting)
    if capabilities and b"LOGINDISABLED" in capabilities.group(1).upper().split():
        # Do not send the password: the server says it would refuse it in plaintext.
        return tempfail("IMAP server advertises LOGINDISABLED (needs TLS: use imaps://)")
    await announce_client(talk, capabilities.group(1).upper().split() if capabilities else ())

    pending = b"a1 LOGIN"
    for text, literal in (astring(user), astring(password)):
        pending += b" " + text
        if literal is None:
            continue
        await talk.send(pending + b"\r\n")
        answer = await _until_continuation(talk)
        if answer is not None:  # the server refused the command before the literal
            return answer
        pending = literal
    await talk.send(pending + b"\r\n")
    while True:
        line = await _response(talk)
        if line.startswith(b"* "):
            continue  # untagged data (CAPABILITY, BYE before closing...)
        return _verdict(line)


async def announce_client(talk: Conversation, capabilities: Collection[bytes]) -> None:
    """RFC 2971 ID with the SMTP client's address, as Dovecot's and Roundcube's proxies send
    it, so a server that trusts us penalises and logs that address instead of ours.

    NO or BAD only means the server will not take it from us: the login goes on.
    """
    address = client_address(talk.client)
    if address is None or b"ID" not in capabilities:
        return
    fields = [(b"x-originating-ip", address.ip), (b"x-originating-port", address.port)]
    fields += [(b"x-connected-ip", address.local_ip), (b"x-connected-port", address.local_port)]
    pairs = [b'"%s" %s' % (key, quoted(str(value))) for key, value in fields if value is not None]
    await talk.send(b"i0 ID (" + b" ".join(pairs) + b")\r\n")
    line = await _response(talk)
    while line.startswith(b"* "):  # * ID (the server's own fields), or other untagged data
        line = await _response(talk)
    if not _ID_DONE.match(line):
        raise ProtocolError("unexpected IMAP response to ID")


def quoted(text: str) -> bytes:
    """An IMAP quoted string (RFC 3501 §4.3); ValueError for what one cannot carry."""
    data = text.encode("ascii")  # UnicodeEncodeError is a ValueError
    if any(c < 32 or c == 127 for c in data):
        raise ValueError("control character in an IMAP quoted string")
    return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


async def _until_continuation(talk: Conversation) -> Outcome | None:
    while True:
        line = await _response(talk)
        if line.startswith(b"+"):
            return None
        if not line.startswith(b"* "):
            return _verdict(line)


def _verdict(line: bytes) -> Outcome:
    # Only the status and the response-code atom are reported: the server's free text
    # after we sent a password could echo it.
    match = _TAGGED.match(line)
    if match is None:
        raise ProtocolError("unexpected IMAP response to LOGIN")
    status = match.group(1).upper().decode()
    code = (match.group(2) or b"").upper().decode()
    said = f"IMAP {status} [{code}]" if code else f"IMAP {status}"
    if status == "OK":
        return accept(f"{said} to LOGIN")
    if status == "BAD":
        return tempfail(f"{said}: server did not accept the LOGIN command")
    if code in TEMPORARY_CODES:
        return tempfail(f"{said} to LOGIN")
    return reject(f"{said} to LOGIN")


class ImapLogin:
    """Asks a remote IMAP server whether user and password log in."""

    name = "imap"

    def __init__(self, server: RemoteServer) -> None:
        self.server = server
        self.target = server.target

    async def verify(self, user: str, secret: Secret, client: ClientIdentity) -> Outcome:
        return await self.server.converse(client, user, secret, login, b"a2 LOGOUT\r\n")


def create(spec: BackendSpec) -> ImapLogin:
    return ImapLogin(RemoteServer.from_settings(BACKEND.settings(spec), SCHEMES))
