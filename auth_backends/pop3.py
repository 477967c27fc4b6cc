"""Remote POP3 login check: -R pop3://HOST[:PORT], pop3s:// (USER/PASS) or apop:// (APOP).

POP3 answers (RFC 1939, extended response codes RFC 2449 and RFC 3206):
  +OK                                   -> ACCEPT
  -ERR, -ERR [AUTH]                     -> REJECT
  -ERR [SYS/TEMP] / [SYS/PERM] / [LOGIN-DELAY]
                                        -> TEMPFAIL: the server could not check or will
                                           not let the user in now; no word on the password
  -ERR [IN-USE]                         -> ACCEPT: RFC 2449 §8.1.2 says the authentication
                                           succeeded and only the maildrop is locked, which
                                           happens while the user's own mail client is
                                           connected; that must not stop them sending mail
                                           (after USER, which proves nothing: TEMPFAIL)
  CAPA without USER (plaintext login off)  -> TEMPFAIL, and the password is not sent
  greeting -ERR, no APOP timestamp, garbage, timeout, refused -> TEMPFAIL
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection

from auth_backends.client_address import client_address
from auth_backends.kinds import POP3 as BACKEND
from auth_backends.remote import Conversation, ProtocolError, RemoteServer, safe_text
from ofmipd.auth import Outcome, Secret, accept, reject, tempfail
from ofmipd.config import BackendSpec
from ofmipd.identity import ClientIdentity

SCHEMES = {"pop3": (110, False), "pop3s": (995, True), "apop": (110, False)}
MAX_CAPA_LINES = 200
TEMPORARY_CODES = {"SYS/TEMP", "SYS/PERM", "LOGIN-DELAY"}
_CODE = re.compile(rb"^-ERR \[([A-Za-z0-9/-]+)")
_TIMESTAMP = re.compile(rb"<[\x21-\x3b\x3d\x3f-\x7e]+>")  # RFC 1939 §7: a msg-id in <...>


def _verdict(line: bytes, command: str) -> Outcome:
    # Only the status and the code are reported: free text after PASS could echo it.
    if line.startswith(b"+OK"):
        return accept(f"POP3 +OK to {command}")
    if not line.startswith(b"-ERR"):
        raise ProtocolError(f"unexpected POP3 response to {command}")
    match = _CODE.match(line)
    code = match.group(1).upper().decode() if match else ""
    said = f"POP3 -ERR [{code}] to {command}" if code else f"POP3 -ERR to {command}"
    if code == "IN-USE" and command != "USER":  # USER proves nothing about the password
        return accept(f"{said}: password accepted, maildrop busy")
    if code in TEMPORARY_CODES or code == "IN-USE":
        return tempfail(said)
    return reject(said)


class Pop3Login:
    """Asks a remote POP3 server whether user and password log in (USER/PASS or APOP)."""

    name = "pop3"

    def __init__(self, server: RemoteServer) -> None:
        self.server = server
        self.target = server.target
        self.apop = server.scheme == "apop"

    async def verify(self, user: str, secret: Secret, client: ClientIdentity) -> Outcome:
        return await self.server.converse(client, user, secret, self.login, b"QUIT\r\n")

    async def login(self, talk: Conversation, user: bytes, password: bytes) -> Outcome:
        greeting = await talk.line()
        if greeting.startswith(b"-ERR"):
            return tempfail(f"POP3 server refused the connection: {safe_text(greeting[4:])}")
        if not greeting.startswith(b"+OK"):
            raise ProtocolError(f"not a POP3 greeting: {safe_text(greeting)!r}")
        await announce_client(talk, offered_in_greeting(greeting))
        if self.apop:
            timestamp = _TIMESTAMP.search(greeting)
            if timestamp is None:
                return tempfail("POP3 greeting has no APOP timestamp (APOP not enabled?)")
            if b" " in user:
                return reject("APOP cannot carry a user name containing a space")
            digest = hashlib.md5(timestamp.group(0) + password).hexdigest().encode()
            await talk.send(b"APOP " + user + b" " + digest + b"\r\n")
            return _verdict(await talk.line(), "APOP")
        if not await self._offers_user(talk):
            # Do not send the password: the server says it would refuse it (plaintext off).
            return tempfail("POP3 server does not offer USER now (CAPA; needs TLS: use pop3s://)")
        await talk.send(b"USER " + user + b"\r\n")
        answer = await talk.line()
        if not answer.startswith(b"+OK"):
            return _verdict(answer, "USER")
        await talk.send(b"PASS " + password + b"\r\n")
        return _verdict(await talk.line(), "PASS")

    async def _offers_user(self, talk: Conversation) -> bool:
        """RFC 2449 CAPA; a server without CAPA (plain RFC 1939) is assumed to take USER."""
        await talk.send(b"CAPA\r\n")
        answer = await talk.line()
        if answer.startswith(b"-ERR"):
            return True
        if not answer.startswith(b"+OK"):
            raise ProtocolError("unexpected POP3 response to CAPA")
        offered = set()
        for _ in range(MAX_CAPA_LINES):
            line = await talk.line()
            if line == b".":
                return b"USER" in offered
            offered.add(line.split(b" ", 1)[0].upper())
        raise ProtocolError(f"POP3 CAPA list longer than {MAX_CAPA_LINES} lines")


def offered_in_greeting(greeting: bytes) -> Collection[bytes]:
    """Dovecot lists XCLIENT in its greeting ("+OK [XCLIENT] ..."), not in CAPA, and only
    to a trusted peer (login_trusted_networks)."""
    return (b"XCLIENT",) if greeting.upper().startswith(b"+OK [XCLIENT]") else ()


async def announce_client(talk: Conversation, offered: Collection[bytes]) -> None:
    """XCLIENT with the SMTP client's address, as Dovecot's pop3 proxy sends it, so the
    server penalises and logs that address instead of ours.

    Dovecot answers one line and does not greet again (src/pop3-login/client.c
    cmd_xclient). -ERR only means the server will not take it from us: the login goes on.
    """
    address = client_address(talk.client)
    if address is None or b"XCLIENT" not in offered:
        return
    port = b" PORT=%d" % address.port if address.port else b""
    await talk.send(b"XCLIENT ADDR=" + address.ip.encode("ascii") + port + b"\r\n")
    answer = await talk.line()
    if not answer.startswith((b"+OK", b"-ERR")):
        raise ProtocolError("unexpected POP3 response to XCLIENT")


def create(spec: BackendSpec) -> Pop3Login:
    return Pop3Login(RemoteServer.from_settings(BACKEND.settings(spec), SCHEMES))
