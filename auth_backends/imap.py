"""Remote IMAP login check (-R imap://HOST[:PORT] or imaps://): LOGIN answers the password.

The dialogue: the greeting; the capabilities, from the greeting's [CAPABILITY ...] or else
by asking (Exchange's and Gmail's greetings carry none); STARTTLS when the server offers
it (tls=auto or starttls, see auth_backends.remote), then the capabilities asked again
over TLS, forgetting what was said in cleartext (RFC 3501 §6.2.1); LOGIN, unless the
server advertises LOGINDISABLED.

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
  LOGINDISABLED (after any STARTTLS), STARTTLS refused or not offered where required,
  greeting BYE, PREAUTH, garbage, timeout, refused -> TEMPFAIL, and no password is sent
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
_GREETING = re.compile(rb"^\* (OK|PREAUTH|BYE)(?: |$)", re.IGNORECASE)
_TAGGED = re.compile(rb"^([A-Za-z0-9]+) (OK|NO|BAD)(?: (.*))?$", re.IGNORECASE | re.DOTALL)
_CODE = re.compile(rb"^\[([A-Za-z0-9-]+)[ \]]")
_LITERAL_AT_END = re.compile(rb"\{(\d{1,10})\+?\}$")
_GREETING_CAPABILITY = re.compile(rb"^\* OK \[CAPABILITY ([^\]]*)\]", re.IGNORECASE)
_UNTAGGED_CAPABILITY = b"* CAPABILITY "
_ID_DONE = re.compile(rb"^i0 (OK|NO|BAD)\b", re.IGNORECASE)


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
    if not line.startswith(b"* "):
        return line
    # Joined once: a line that keeps ending in a literal must not be copied again each time.
    parts: list[bytes] = []
    while (match := _LITERAL_AT_END.search(line)) is not None:
        size = int(match.group(1))
        if size > MAX_LITERAL:
            raise ProtocolError(f"IMAP literal of {size} bytes")
        await talk.literal(size)  # counted against the dialogue's bounds
        parts += (line[: match.start()], b'""')
        line = await talk.line()
    parts.append(line)
    return b"".join(parts)


def _tagged(line: bytes, tag: bytes, command: str) -> tuple[str, str]:
    """(status, response code) of our command's tagged answer; anything else is garbage."""
    match = _TAGGED.match(line)
    if match is None or match.group(1) != tag:
        raise ProtocolError(f"unexpected IMAP response to {command}")
    code = _CODE.match(match.group(3) or b"")
    return match.group(2).upper().decode(), (code.group(1).upper().decode() if code else "")


async def _capabilities(talk: Conversation, tag: bytes) -> set[bytes]:
    """Ask CAPABILITY (RFC 3501 §6.1.1)."""
    await talk.send(tag + b" CAPABILITY\r\n")
    offered: set[bytes] = set()
    while True:
        line = await _response(talk)
        if line[: len(_UNTAGGED_CAPABILITY)].upper() == _UNTAGGED_CAPABILITY:
            offered = set(line[len(_UNTAGGED_CAPABILITY) :].upper().split())
        elif not line.startswith(b"* "):
            status, _ = _tagged(line, tag, "CAPABILITY")
            if status != "OK":
                raise ProtocolError(f"IMAP {status} to CAPABILITY")
            return offered


async def _starttls(talk: Conversation) -> None:
    await talk.send(b"s1 STARTTLS\r\n")
    while (line := await _response(talk)).startswith(b"* "):
        pass
    status, code = _tagged(line, b"s1", "STARTTLS")
    if status != "OK":
        said = f"IMAP {status} [{code}]" if code else f"IMAP {status}"
        raise ProtocolError(f"{said} to STARTTLS; the password is not sent")
    await talk.upgrade()


async def login(talk: Conversation, user: bytes, password: bytes) -> Outcome:
    greeting = await _response(talk)
    match = _GREETING.match(greeting)
    if match is None:
        raise ProtocolError(f"not an IMAP greeting: {safe_text(greeting)!r}")
    word = match.group(1).upper()
    if word == b"BYE":
        return tempfail(f"IMAP server refused the connection: {safe_text(greeting[6:])}")
    if word == b"PREAUTH":
        return tempfail("IMAP server greeted PREAUTH, so it cannot check a password")
    listed = _GREETING_CAPABILITY.match(greeting)
    capabilities = (
        set(listed.group(1).upper().split()) if listed else await _capabilities(talk, b"c1")
    )
    if talk.should_upgrade(b"STARTTLS" in capabilities, "STARTTLS"):
        await _starttls(talk)
        capabilities = await _capabilities(talk, b"c2")  # what was said in clear is void
    if b"LOGINDISABLED" in capabilities:
        # Do not send the password: the server says it would refuse it.
        why = "over TLS" if talk.secure else "and no TLS (it offers no STARTTLS, or tls=none)"
        return tempfail(f"IMAP server advertises LOGINDISABLED {why}")
    await announce_client(talk, capabilities)
    return await _login(talk, user, password)


async def _login(talk: Conversation, user: bytes, password: bytes) -> Outcome:
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
    status, code = _tagged(line, b"a1", "LOGIN")
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
        self.transport = server.transport  # for --check-config

    async def verify(self, user: str, secret: Secret, client: ClientIdentity) -> Outcome:
        return await self.server.converse(client, user, secret, login, b"a2 LOGOUT\r\n")


def create(spec: BackendSpec) -> ImapLogin:
    return ImapLogin(RemoteServer.from_settings(BACKEND.settings(spec), SCHEMES))
