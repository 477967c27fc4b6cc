"""Remote POP3 login check: -R pop3://HOST[:PORT], pop3s:// (USER/PASS) or apop:// (APOP).

The dialogue: the greeting; CAPA (RFC 2449); STLS when the server offers it (tls=auto or
starttls, see auth_backends.remote), then CAPA again over TLS, forgetting what was said in
cleartext (RFC 2595 §4); then USER/PASS, or APOP with the greeting's timestamp.

APOP is weaker than USER/PASS over TLS: anyone who sees the greeting's timestamp and the
digest (a man in the middle of a cleartext apop://, or a server log) can try passwords
against MD5 offline, at billions per second. Prefer pop3:// with STLS or pop3s://; use
apop:// over STLS (tls=auto or starttls) where APOP is all a server takes.

POP3 answers (RFC 1939, extended response codes RFC 2449 and RFC 3206), read strictly:
a status is "+OK" or "-ERR", alone or followed by a space ("+OKAY" is garbage):
  +OK                                   -> ACCEPT
  -ERR, -ERR [AUTH]                     -> REJECT
  -ERR [SYS/...] / [LOGIN-DELAY] / [IN-USE]
                                        -> TEMPFAIL: the server could not check or will
                                           not let the user in now. [IN-USE] is no proof
                                           of the password: a server may report the
                                           maildrop lock before it checks the password
  CAPA without USER (plaintext login off), STLS refused or not offered where required
                                        -> TEMPFAIL, and the password is not sent
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
TEMPORARY_CODES = {"LOGIN-DELAY", "IN-USE"}  # and every SYS/... (RFC 3206)
_STATUS = re.compile(rb"^(\+OK|-ERR)(?: |$)")
_CODE = re.compile(rb"^-ERR \[([A-Za-z0-9/-]+)\]")
_TIMESTAMP = re.compile(rb"<[\x21-\x3b\x3d\x3f-\x7e]+>")  # RFC 1939 §7: a msg-id in <...>


def _status(line: bytes) -> bytes | None:
    """b"+OK", b"-ERR", or None for anything else."""
    match = _STATUS.match(line)
    return match.group(1) if match else None


def _verdict(line: bytes, command: str) -> Outcome:
    # Only the status and the code are reported: free text after PASS could echo it.
    status = _status(line)
    if status == b"+OK":
        return accept(f"POP3 +OK to {command}")
    if status is None:
        raise ProtocolError(f"unexpected POP3 response to {command}")
    match = _CODE.match(line)
    code = match.group(1).upper().decode() if match else ""
    said = f"POP3 -ERR [{code}] to {command}" if code else f"POP3 -ERR to {command}"
    if code in TEMPORARY_CODES or code.startswith("SYS/"):
        return tempfail(said)
    return reject(said)


class Pop3Login:
    """Asks a remote POP3 server whether user and password log in (USER/PASS or APOP)."""

    name = "pop3"

    def __init__(self, server: RemoteServer) -> None:
        self.server = server
        self.target = server.target
        self.transport = server.transport  # for --check-config
        self.apop = server.scheme == "apop"

    async def verify(self, user: str, secret: Secret, client: ClientIdentity) -> Outcome:
        return await self.server.converse(client, user, secret, self.login, b"QUIT\r\n")

    async def login(self, talk: Conversation, user: bytes, password: bytes) -> Outcome:
        if self.apop and b" " in user:  # before anything is said
            return reject("APOP cannot carry a user name containing a space")
        greeting = await talk.line()
        status = _status(greeting)
        if status == b"-ERR":
            return tempfail(f"POP3 server refused the connection: {safe_text(greeting[5:])}")
        if status is None:
            raise ProtocolError(f"not a POP3 greeting: {safe_text(greeting)!r}")
        capabilities = await self._capabilities(talk)
        if talk.should_upgrade(capabilities is not None and b"STLS" in capabilities, "STLS"):
            await talk.send(b"STLS\r\n")
            if _status(await talk.line()) != b"+OK":
                raise ProtocolError("POP3 server refused STLS; the password is not sent")
            await talk.upgrade()
            capabilities = await self._capabilities(talk)  # what was said in clear is void
        # XCLIENT: Dovecot lists it in the greeting, others may in CAPA (after STLS)
        await announce_client(talk, {*offered_in_greeting(greeting), *(capabilities or ())})
        if self.apop:
            return await self._apop(talk, greeting, user, password)
        if capabilities is not None and b"USER" not in capabilities:
            # Do not send the password: the server says it would refuse it (plaintext off).
            return tempfail(
                "POP3 server does not offer USER now (CAPA; it wants TLS: offer STLS or "
                "use pop3s://)"
            )
        await talk.send(b"USER " + user + b"\r\n")
        answer = await talk.line()
        if _status(answer) != b"+OK":
            return _verdict(answer, "USER")
        await talk.send(b"PASS " + password + b"\r\n")
        return _verdict(await talk.line(), "PASS")

    async def _apop(
        self, talk: Conversation, greeting: bytes, user: bytes, password: bytes
    ) -> Outcome:
        # The timestamp is the first greeting's, also after STLS (RFC 2595 §4).
        timestamp = _TIMESTAMP.search(greeting)
        if timestamp is None:
            return tempfail("POP3 greeting has no APOP timestamp (APOP not enabled?)")
        digest = hashlib.md5(timestamp.group(0) + password).hexdigest().encode()
        await talk.send(b"APOP " + user + b" " + digest + b"\r\n")
        return _verdict(await talk.line(), "APOP")

    async def _capabilities(self, talk: Conversation) -> set[bytes] | None:
        """RFC 2449 CAPA; None from a server without CAPA (plain RFC 1939)."""
        await talk.send(b"CAPA\r\n")
        status = _status(await talk.line())
        if status == b"-ERR":
            return None
        if status is None:
            raise ProtocolError("unexpected POP3 response to CAPA")
        offered: set[bytes] = set()
        for _ in range(MAX_CAPA_LINES):
            line = await talk.line()
            if line == b".":
                return offered
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
    if _status(answer) is None:
        raise ProtocolError("unexpected POP3 response to XCLIENT")


def create(spec: BackendSpec) -> Pop3Login:
    return Pop3Login(RemoteServer.from_settings(BACKEND.settings(spec), SCHEMES))
