"""The SMTP session: a thin aiosmtpd subclass plus the handler that applies ofmipd's policy.

aiosmtpd parses the protocol. ofmipd replaces the parts that decide who may do
what: EHLO (which extensions, whether AUTH is offered now), AUTH (awaited async
mechanisms asking the Chain), MAIL (AUTH or relay permission required) and DATA
(delivery). The session never learns which launcher started it.

This module is the session glue; beside it are the AUTH exchange (auth_exchange.py),
the idle/DATA timer (idle_timer.py) and the reply lines and rewriting (replies.py).
Every aiosmtpd name used here is guarded by tests/test_aiosmtpd_guard.py.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import re
import time
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.errors import HeaderParseError
from typing import TYPE_CHECKING, Any, cast

from aiosmtpd.smtp import SMTP, Envelope, Session, TLSSetupException, login_always_fail, syntax

from ofmipd.auth import Decision
from ofmipd.data import BareNewline, MessageReader, TooBig, TooLong
from ofmipd.delivery import (
    Submission,
    new_queue_id,
    protocol_name,
    received_header,
    tls_clause,
)
from ofmipd.identity import ClientIdentity
from ofmipd.idle_timer import IdleTimer
from ofmipd.logs import printable
from ofmipd.policy import ClientPolicy, decide
from ofmipd.replies import REPLY_INTERNAL, REPLY_NEED_AUTH, REPLY_NEED_TLS, rewrite

if TYPE_CHECKING:
    from ofmipd.app import App
    from ofmipd.quota import Holds
    from ofmipd.relay import Transaction

log = logging.getLogger("ofmipd.smtp")

# The stream buffer, and so the largest DATA chunk read at once. aiosmtpd uses its
# 1001-octet line limit here, which pauses and resumes the socket every 2 KB of a
# message; command and AUTH lines are still held to their own limits when read.
STREAM_LIMIT = 32 * 1024

# "<dot-atom@dot-atom> [params]", the path nearly every client sends; anything else
# (quoted local parts, routes, literals, comments) goes through the email parser.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = rf"(?s)[ \t]*<({_ATOM}(?:\.{_ATOM})*@{_ATOM}(?:\.{_ATOM})*)>[ \t]*(?![ \t(])(.*)\Z"


@functools.cache
def _simple_path() -> re.Pattern[str]:
    return re.compile(_SIMPLE_PATH)


def _unterminated_quote(token: object) -> bool:
    """A quoted string the path ends inside (`<"x>`): the email parser closes it for us,
    which would turn `<"x>` into the address `"x>"`."""
    if getattr(token, "token_type", None) == "bare-quoted-string" and getattr(token, "defects", ()):
        return True
    return isinstance(token, list) and any(_unterminated_quote(part) for part in token)


class SubmissionSession(Session):
    """aiosmtpd makes a new Session after STARTTLS, which is what RFC 3207 wants:
    anything learnt before TLS, AUTH included, is forgotten."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.user: str | None = None
        self.decision: Decision | None = None
        self.mechanism: str | None = None  # the AUTH mechanism that logged in


@functools.cache
def _smtp_commands() -> tuple[str, ...]:
    return tuple(name[5:] for name in dir(SubmissionProtocol) if name.startswith("smtp_"))


class SubmissionProtocol(SMTP):
    """The asyncio protocol of one connection: its SMTP session, across STARTTLS."""

    local_part_limit = 64  # RFC 5321 4.5.3.1.1, in octets: commands are ASCII here

    def __init__(self, app: App, client: ClientIdentity, *, implicit_tls: bool = False) -> None:
        self.app = app
        self.implicit_tls = implicit_tls
        self.client = client  # the launcher's; a PROXY header may replace it before the banner
        self.policy = ClientPolicy()
        self.session_id = app.new_session_id()
        self.started = time.monotonic()
        self.messages = 0
        self.last_user: str | None = None
        self.last_backend: str | None = None
        self._plain_replies = False
        self.redact_replies = False  # during a SCRAM exchange: its messages stay out of logs
        self.errors = 0  # the client's, as Postfix's smtpd_hard_error_limit counts them
        self.our_fault = False  # the next reply is 4xx for our injector's failure, not theirs
        self.counted = False
        self.result: str | None = None
        self.error: str | None = None  # why a connection failed before its session began
        self.tls_established = False  # a TLS handshake has completed (implicit or STARTTLS)
        self.busy = False
        self.draining = False
        self.relay_transaction: Transaction | None = None  # --relay: open downstream
        self.quota_holds: Holds | None = None  # --quota: this transaction's reservations
        # --policy: what belongs to the current message (cleared with its envelope)
        self.policy_instance: str | None = None  # Postfix's "instance" attribute
        self.policy_headers: list[str] = []  # PREPEND answers, added to the message
        self.transactions = 0
        self.close_after_reply = False  # a policy server's 421/521: the session ends
        self._init_aiosmtpd(app, implicit_tls)
        self.ended: asyncio.Future[None] = self.loop.create_future()  # the end line is out
        self.timer = IdleTimer(
            self.loop, app.config.idle_timeout, app.config.ehlo_timeout, self._timeout_cb
        )

    def _init_aiosmtpd(self, app: App, implicit_tls: bool) -> None:
        """What aiosmtpd's SMTP.__init__ sets, without its per-connection class scan.

        SMTP.__init__ runs inspect.getmembers() over the protocol and the handler on
        every connection (about 0.3 ms, a tenth of a short session's CPU) to find
        methods that never change. ofmipd finds them once per class and App.
        tests/test_smtp_init.py checks this against SMTP.__init__, so an aiosmtpd
        upgrade that adds state fails CI instead of misbehaving.
        """
        loop = asyncio.get_running_loop()
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=loop, limit=STREAM_LIMIT),
            client_connected_cb=self._cb_client_connected,
            loop=loop,
        )
        self.__ident__ = "ESMTP ofmipd"
        self.loop = loop
        handler = self.event_handler = handler_for(app)
        self.data_size_limit = app.config.size_limit
        # SMTPUTF8 (RFC 6531): UTF-8 addresses in MAIL and RCPT; the message is bytes anyway.
        # Arguments that are not UTF-8 decode to surrogates, which _getaddr refuses.
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        # aiosmtpd keeps command_size_limits on the class, shared by every
        # connection (and grown by each EHLO); ofmipd gives each session its own.
        self.command_size_limits = collections.defaultdict(lambda: self.command_size_limit)
        self.command_size_limits["MAIL"] = 512 + 26
        self.hostname = app.hostname
        self.tls_context = None if implicit_tls else app.starttls_context
        self.require_starttls = False  # ofmipd's policy decides, from identity and rules
        self._timeout_duration = app.config.idle_timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = False
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = login_always_fail
        self._auth_required = False
        self._auth_methods = {}  # ofmipd's smtp_AUTH runs its own mechanisms
        self._handle_hooks = handler.hooks
        self._ehlo_hook_ver = None
        self._smtp_methods = {name: getattr(self, f"smtp_{name}") for name in _smtp_commands()}
        self._enforce_call_limit = True
        self._call_limit_base = {}
        self._call_limit_default = app.config.max_commands

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """Parse the address of MAIL FROM / RCPT TO, as aiosmtpd 1.4 does.

        aiosmtpd's own version defines a typing.Protocol class on every call (two
        per message, a tenth of the loop's time under load); the parsing is the same.
        (None, None) is a malformed path: aiosmtpd answers 553 5.1.3.
        """
        if not arg:
            return "", ""
        simple = _simple_path().match(arg)
        if simple:  # what get_angle_addr gives for it, at a tenth of the cost
            path = simple.group(1)
            if len(path.rpartition("@")[0]) > self.local_part_limit:
                return None, None
            return path, simple.group(2)
        parse = get_angle_addr if arg.lstrip().startswith("<") else get_addr_spec
        try:
            address, rest = parse(arg)
            path = address.addr_spec
        except (HeaderParseError, IndexError, AttributeError):
            # Besides HeaderParseError, the email package's private parser crashes on some
            # garbage ('"', '<a@[>'); aiosmtpd lets that become a 451 and a traceback.
            return None, None
        consumed = arg[: len(arg) - len(rest)].replace("\t", " ")  # a tab is whitespace
        if not (consumed.isprintable() and path.isprintable()):
            # A control character (C0 or DEL): the parser lets them through, even unquoted.
            # No address needs one; a NUL made the injector's argv unspawnable (451 and a
            # traceback), and a CR would break a reply that echoes the address.
            return None, None
        if len(path.rpartition("@")[0]) > self.local_part_limit or _unterminated_quote(address):
            return None, None
        return path, rest

    async def handle_exception(self, error: Exception) -> str:
        # Whatever failed, the half-built envelope goes with it: the client hears "try
        # again later", and its next MAIL must start a transaction, not get "nested MAIL".
        self._set_rset_state()
        return str(await super().handle_exception(error))

    def _create_session(self) -> Session:
        return SubmissionSession(self.loop)

    @property
    def session_state(self) -> SubmissionSession:
        # No assert here: aiosmtpd's __init__ reads every attribute via inspect.getmembers.
        return cast(SubmissionSession, self.session)

    # ---- connection -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio calls this once a TLS handshake is complete (implicit TLS, and again
        # after STARTTLS), never for one that failed.
        if transport.get_extra_info("ssl_object") is not None:
            self.tls_established = True
        super().connection_made(transport)

    async def _handle_client(self) -> None:
        try:
            await self._session()
        except Exception as error:  # a bug in ofmipd: say so once, then end the connection
            log.error("session %s: %s", self.session_id, type(error).__name__, exc_info=error)
        finally:  # however the session ended, the connection (and its slot) ends with it
            self._close()

    async def _session(self) -> None:
        self.client = self.client.with_changes(tls=self.tls_active)
        self.policy = decide(self.client, self.app.config.tls, self.app.rules)
        log.debug(  # the end line repeats all of it; this one helps follow a live session
            "session %s: connect from %s port %s (%s) local %s:%s rule=%s",
            self.session_id,
            self.client.ip or "unknown",
            self.client.port,
            self.client.source,
            self.client.local_ip,
            self.client.local_port,
            self.policy.rule,
        )
        self.app.metrics.session_started()
        self.counted = True
        if self.policy.deny:
            self.result = "refused"
            await self.push(self.policy.deny_message)
            self._close()
            return
        try:
            await super()._handle_client()
        except ConnectionError:
            pass  # the client went away mid-reply; connection_lost has the details

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _set_post_data_state(self) -> None:
        """Every end of a transaction (RSET, EHLO, HELO, after DATA) ends the relay's too,
        and settles its quota holds (charged only if delivery said 250)."""
        self.end_relay_transaction()
        self.end_quota_holds()
        self.policy_instance = None
        self.policy_headers = []
        super()._set_post_data_state()

    def end_relay_transaction(self) -> None:
        transaction, self.relay_transaction = self.relay_transaction, None
        if transaction is not None:
            transaction.abort()

    def end_quota_holds(self) -> None:
        holds, self.quota_holds = self.quota_holds, None
        if holds is not None and self.app.quotas is not None:
            self.app.quotas.end(holds)

    def connection_lost(self, error: Exception | None) -> None:
        self.end_relay_transaction()
        self.end_quota_holds()
        if self.ended.done():  # called already (smtp_STARTTLS does, after a failed handshake)
            return
        try:
            self._account_for_end()
        finally:  # the launcher waits on `ended` to give the connection's slot back
            self.ended.set_result(None)
            self.timer.cancel()
            super().connection_lost(error)

    def end_before_session(self, result: str, error: str | None = None) -> None:
        """The connection ended before this protocol was attached to it (PROXY header
        refused, TLS handshake failed): the one end line, as connection_lost would."""
        if self.ended.done():
            return
        self.result, self.error = result, error
        try:
            self._account_for_end()
        finally:
            self.ended.set_result(None)

    def greeting_time_left(self) -> float:
        return self.timer.greeting_time_left()

    def _account_for_end(self) -> None:
        if self.result is None:
            if not self.counted:
                self.result = "dropped"  # gone before the banner (PROXY refused, reset)
            elif self.last_user is not None:
                self.result = "authenticated"
            else:
                self.result = "relay" if self.policy.relay else "unauthenticated"
        # One line per session, for the admin and for log analysis.
        log.info(
            "session %s: end client=%s port=%s source=%s tls=%s user=%s backend=%s messages=%d"
            " result=%s seconds=%.3f%s",
            self.session_id,
            self.client.ip or "unknown",
            self.client.port,
            self.client.source,
            "yes" if self.tls_active else "no",
            printable(self.last_user or "-"),
            self.last_backend or "-",
            self.messages,
            self.result,
            time.monotonic() - self.started,
            f" error={printable(self.error)}" if self.error else "",
        )
        if self.counted:
            self.app.metrics.session_ended(self.result)

    @property
    def tls_active(self) -> bool:
        # Not "implicit TLS configured" nor "STARTTLS begun": a completed handshake, or a
        # trusted terminator in front (identity.with_tls_in_front).
        return self.tls_established or self.client.tls_in_front

    # ---- replies and timeouts -------------------------------------------------------

    async def push(self, status: Any) -> None:
        if isinstance(status, str) and not self._plain_replies:
            status = rewrite(status, _smtp_commands())
        if isinstance(status, str) and not status.isascii():
            # With SMTPUTF8 on, arguments that are not UTF-8 hold surrogates, and aiosmtpd
            # echoes some (VRFY): a '?' for each, not a UnicodeEncodeError.
            status = status.encode("utf-8", errors="replace").decode("utf-8")
        if self.redact_replies:
            await self._push_unlogged(status)
        else:
            if self.app.config.debug:
                log.debug("session %s << %s", self.session_id, status)
            await super().push(status)
        if self.close_after_reply:
            self._close()
            return
        code = status[:1] if isinstance(status, str) else ""
        our_fault, self.our_fault = self.our_fault, False
        if code in ("4", "5") and not status.startswith("421") and not our_fault:
            self.errors += 1
            if self.errors >= self.app.config.max_errors:
                log.warning(
                    "session %s: %d errors from %s, closing",
                    self.session_id,
                    self.errors,
                    self.client.ip or "unknown",
                )
                await super().push("421 4.7.0 Too many errors, closing connection")
                self._close()

    async def _push_unlogged(self, status: str | bytes) -> None:
        """A reply in a SCRAM exchange: aiosmtpd's push would put it in its debug trace."""
        data = status.encode("ascii", "replace") if isinstance(status, str) else status
        if self.app.config.debug:
            log.debug("session %s << %s <redacted>", self.session_id, data[:3].decode())
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.write(data + b"\r\n")

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd calls this for every command: push the idle deadline back."""
        self.timer.reset(duration)
        self._timeout_handle = self.timer.handle  # what aiosmtpd's connection_lost cancels

    def _timeout_cb(self) -> None:
        # RFC 5321 §4.5.3.2: say why before closing an idle or stalled session.
        log.info("session %s: timeout", self.session_id)
        self.result = "timeout"
        self.say_goodbye("421 4.4.2 Timeout exceeded, closing connection")

    def say_goodbye(self, line: str) -> None:
        """Send a last reply outside the command loop (timeouts, shutdown) and close."""
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.write(line.encode() + b"\r\n")
            transport.close()

    def begin_shutdown(self) -> None:
        """SIGTERM: idle sessions end now; one inside AUTH or DATA finishes that first."""
        self.draining = True
        if not self.busy:
            self.say_goodbye("421 4.3.2 Service shutting down, try again later")

    async def _busy(self, command: Any) -> None:
        self.busy = True
        try:
            await command
        finally:
            self.busy = False
            if self.draining:
                self.say_goodbye("421 4.3.2 Service shutting down, try again later")

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        await self._busy(self._data(arg))
        if self.transport is not None:  # idle again: the DATA timeout no longer applies
            self._reset_timeout()

    async def _data(self, arg: str) -> None:
        """aiosmtpd's DATA checks and hand-off, with ofmipd's faster reader (ofmipd/data.py)."""
        if await self.check_helo_needed():
            return
        envelope = self.envelope
        assert envelope is not None
        if not envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        if self.session_state.authenticated or self.policy.relay:
            self._reset_timeout(self.app.config.data_timeout)
        transaction = self.relay_transaction
        if transaction is not None:  # DATA goes down first: the client's 354 is the MTA's
            from ofmipd.relay_stream import begin_message, relay_message

            refusal = await begin_message(self, transaction)
            if refusal is not None:
                self._set_post_data_state()
                await self.push(refusal)
                return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        message = MessageReader(
            self._reader,
            size_limit=self.app.config.size_limit,
            line_limit=self.line_length_limit,
            bare_newline=self.app.config.bare_newline,
        )
        try:
            if transaction is not None:
                status = await relay_message(self, transaction, message)
            else:
                content = await message.joined()
        except asyncio.CancelledError:  # the connection went away mid-message
            self._close()
            raise
        except asyncio.IncompleteReadError:
            self._close()
            return
        except TooBig:
            self._set_post_data_state()
            await self.push("552 5.3.4 Message size exceeds fixed limit")
            return
        except TooLong:
            self._set_post_data_state()
            await self.push("500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)")
            return
        except BareNewline as bare:
            self._set_post_data_state()
            log.warning(
                "session %s: message from %s refused: bare %s received (--bare-newline reject)",
                self.session_id,
                self.client.ip or "unknown",
                bare,
            )
            # Postfix's smtpd_forbid_bare_newline = reject answers the same.
            await self.push(f"550 5.5.2 Error: bare {bare} received")
            return
        if transaction is None:
            envelope.content = envelope.original_content = content
            status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push(status)

    # ---- EHLO -----------------------------------------------------------------------

    def auth_allowed_now(self) -> bool:
        return not self.policy.tls_required or self.tls_active

    def _own_certificate(self) -> bytes | None:
        """The DER certificate of this session's own TLS (not a terminator's in front)."""
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport else None
        if ssl_object is None:
            return None
        from ofmipd.tls import certificate_der

        return certificate_der(ssl_object.context)

    def plus_offered(self) -> bool:
        """SCRAM-*-PLUS binds to our own TLS session, so only there is it offered."""
        return any(m.endswith("-PLUS") for m in self.app.mechanisms) and (
            self._own_certificate() is not None
        )

    def channel_binding(self) -> bytes | None:
        """RFC 5929 tls-server-end-point data for this session."""
        der = self._own_certificate()
        if der is None:
            return None
        from ofmipd.scram import end_point_hash

        return end_point_hash(der)

    def offered_mechanisms(self) -> tuple[str, ...]:
        if self.plus_offered():
            return self.app.mechanisms
        return tuple(m for m in self.app.mechanisms if not m.endswith("-PLUS"))

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        self.timer.greeted()
        self._set_rset_state()
        session = self.session_state
        session.extended_smtp = True
        session.host_name = hostname
        lines = [
            self.hostname,
            "PIPELINING",
            f"SIZE {self.data_size_limit}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
        ]
        if self.tls_context is not None and not self.tls_active:
            lines.append("STARTTLS")
        if self.auth_allowed_now():
            lines.append("AUTH " + " ".join(self.offered_mechanisms()))
        # One write for the whole reply: one packet, not one per extension.
        reply = "".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}"
        self._plain_replies = True
        try:
            await self.push(reply)
        finally:
            self._plain_replies = False

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        if hostname:
            self.timer.greeted()
        self._plain_replies = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._plain_replies = False

    async def smtp_PROXY(self, arg: str | None) -> None:
        # A PROXY header from a peer not in --proxy-protocol is an attempt to forge
        # the client address: refuse it and end the session.
        log.warning(
            "session %s: PROXY header from untrusted peer %s; closing",
            self.session_id,
            self.client.peer_ip or "unknown",
        )
        await self.push("554 5.7.0 PROXY protocol not accepted from your address")
        self._close()

    @syntax("STARTTLS")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.tls_active:
            await self.push("503 5.5.1 TLS already active")
            return
        if self.tls_context is None:
            await self.push("502 5.5.1 STARTTLS not offered")
            return
        try:
            await super().smtp_STARTTLS(arg)
        except TLSSetupException as error:
            # One end line naming the failure, not aiosmtpd's handle_exception traceback.
            # The SSL layer never attached this protocol, so asyncio will not call
            # connection_lost: do what aiosmtpd would, once.
            from ofmipd.tls import handshake_failure

            self.result = "tls-failed"
            self.error = handshake_failure(error.__cause__, timed_out=False)
            if self.transport is not None:
                self.transport.close()
            self.connection_lost(error)
            return
        self.client = self.client.with_changes(tls=True)

    # ---- AUTH -----------------------------------------------------------------------

    @syntax("AUTH <mechanism> [initial-response]")
    async def smtp_AUTH(self, arg: str | None) -> None:
        # Imported on the first AUTH, after the banner: a session without one (a relay
        # client, a refused one) never loads the exchange, the mechanisms or the limiter.
        from ofmipd import auth_exchange

        await self._busy(auth_exchange.run(self, arg))

    def authenticated(self, decision: Decision, mechanism: str | None = None) -> None:
        """The AUTH exchange accepted `decision`: MAIL may follow."""
        session = self.session_state
        session.authenticated = True
        session.user = decision.user
        session.decision = decision
        session.mechanism = mechanism
        self.last_user = decision.user
        decider = decision.decided_by
        self.last_backend = decider.backend if decider else None

    # ---- helpers for the handler ----------------------------------------------------

    def mail_refusal(self) -> str | None:
        """The reply refusing MAIL to this session, or None if it may send."""
        if self.session_state.authenticated or self.policy.relay:
            return None
        if not self.auth_allowed_now():
            return REPLY_NEED_TLS
        return REPLY_NEED_AUTH

    async def policy_refusal(
        self,
        state: str,
        *,
        sender: str | None = None,
        recipient: str = "",
        size: int | None = None,
        queue_id: str = "",
    ) -> str | None:
        """Ask the --policy services at `state`: their refusal, or None (PREPEND
        answers are kept for the message; a 421 or 521 also ends the session)."""
        clients = self.app.policy_clients
        if clients is None or (state == "MAIL" and not clients.at_mail):
            return None
        attributes = await self.policy_attributes(state, sender, recipient, size, queue_id)
        decision = await clients.check(attributes, self.session_id)
        if decision.reply is None:  # a refused recipient's headers go with it
            self.policy_headers.extend(decision.prepend)
        else:
            self.app.metrics.policy_refused(state, decision.reply)
        if decision.disconnect:
            self.close_after_reply = True
            self.result = "policy-disconnect"
        return decision.reply

    async def policy_attributes(
        self, state: str, sender: str | None, recipient: str, size: int | None, queue_id: str
    ) -> dict[str, object]:
        """The attributes of Postfix's SMTPD_POLICY_README that a submission server knows."""
        session = self.session_state
        envelope = self.envelope
        assert envelope is not None
        if self.policy_instance is None:  # one per message, as Postfix's
            self.transactions += 1
            self.policy_instance = f"{self.session_id}.{self.transactions}"
        if size is None:  # before DATA: the SIZE the client announced at MAIL, as Postfix
            size = announced_size(envelope.mail_options)
        name = await self.reverse_name() or "unknown"
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport else None
        cipher = ssl_object.cipher() if ssl_object is not None else None
        return {
            "request": "smtpd_access_policy",
            "protocol_state": state,
            "protocol_name": "ESMTP" if session.extended_smtp else "SMTP",
            "helo_name": session.host_name or "",
            "queue_id": queue_id,
            "sender": envelope.mail_from if sender is None else sender,
            "recipient": recipient,
            # SMTPD_POLICY_README: "non-zero only in the DATA and END-OF-MESSAGE stages"
            "recipient_count": len(envelope.rcpt_tos) if state == "END-OF-MESSAGE" else 0,
            "client_address": self.client.ip,
            "client_name": name,
            "reverse_client_name": name,
            "client_port": self.client.port or 0,  # numbers unknown are 0, as Postfix
            "instance": self.policy_instance,
            "sasl_method": session.mechanism or "",
            "sasl_username": session.user or "",
            "size": size,
            "encryption_protocol": ssl_object.version() if ssl_object is not None else "",
            "encryption_cipher": cipher[0] if cipher else "",
            "encryption_keysize": cipher[2] if cipher else 0,  # 0 in plaintext, as Postfix
            "server_address": self.client.local_ip,
            "server_port": self.client.local_port or 0,
        }

    async def reverse_name(self) -> str | None:
        if self.client.hostname or not self.client.ip or self.app.reverse_names is None:
            return self.client.hostname
        return await self.app.reverse_names.name(self.client.ip)


def announced_size(mail_options: list[str]) -> int:
    """MAIL's SIZE= parameter (RFC 1870), 0 if none."""
    for option in mail_options:
        if option[:5].upper() == "SIZE=" and option[5:].isascii() and option[5:].isdigit():
            return int(option[5:])
    return 0


def handler_for(app: App) -> SubmissionHandler:
    """The handler of `app`'s sessions, made once per App (its hooks are found by name)."""
    handler = app.smtp_handler
    if not isinstance(handler, SubmissionHandler):
        handler = app.smtp_handler = SubmissionHandler(app)
    return handler


class SubmissionHandler:
    """aiosmtpd handler hooks; per-connection state lives on the server object."""

    def __init__(self, app: App) -> None:
        self.app = app
        # aiosmtpd looks hooks up by name; found once here rather than per connection.
        self.hooks = {
            name[7:]: getattr(self, name) for name in dir(self) if name.startswith("handle_")
        }

    async def handle_MAIL(
        self,
        server: SubmissionProtocol,
        session: SubmissionSession,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        refusal = server.mail_refusal()
        if refusal:
            return refusal
        senders = self.app.senders
        if senders is not None and session.user and not senders.allows(session.user, address):
            log.warning(
                "session %s: user %s may not send as <%s>",
                server.session_id,
                printable(session.user),
                printable(address),
            )
            return f"553 5.7.1 <{address}>: Sender address not owned by user {session.user}"
        server.policy_instance, server.policy_headers = None, []  # a new transaction
        refusal = await server.policy_refusal(
            "MAIL", sender=address, size=announced_size(mail_options)
        )
        if refusal is not None:
            return refusal
        if self.app.quotas is not None:
            refusal = await self.over_quota(server, session, "messages")
            if refusal is not None:
                return refusal
        if self.app.relay is not None:
            from ofmipd.relay import Identity

            # The name as the Received header gives it (the lookup is cached for DATA).
            client = server.client.with_changes(hostname=await server.reverse_name())
            identity = Identity(
                client, session.host_name, session.user, bool(session.extended_smtp)
            )
            reply, transaction = await self.app.relay.begin(identity, address, mail_options)
            if transaction is None:
                server.end_quota_holds()
                return reply
            server.relay_transaction = transaction
        else:
            reply = "250 2.1.0 Sender OK"
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return reply

    async def handle_RCPT(
        self,
        server: SubmissionProtocol,
        session: SubmissionSession,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= self.app.config.max_recipients:
            return "452 4.5.3 Too many recipients"
        refusal = await server.policy_refusal("RCPT", recipient=address)
        if refusal is not None:
            return refusal
        if self.app.quotas is not None:
            refusal = await self.over_quota(server, session, "recipients")
            if refusal is not None:
                return refusal
        reply = "250 2.1.5 Recipient OK"
        if server.relay_transaction is not None:
            reply = await server.relay_transaction.rcpt(address)  # the downstream's verdict
            if not reply.startswith("2"):
                if server.quota_holds is not None and self.app.quotas is not None:
                    self.app.quotas.release_last(server.quota_holds)
                return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return reply

    async def handle_DATA(
        self,
        server: SubmissionProtocol,
        session: SubmissionSession,
        envelope: Envelope,
    ) -> str:
        content = envelope.original_content or b""
        refusal = self.header_refusal(server, session, content)
        if refusal is not None:
            return refusal
        queue_id = new_queue_id()
        refusal = await self.end_of_message_refusal(server, queue_id, len(content))
        if refusal is not None:
            return refusal
        submission = Submission(
            queue_id=queue_id,
            sender=envelope.mail_from or "",
            recipients=tuple(envelope.rcpt_tos),
            content=self.prepended(server)
            + await self.received(server, session, queue_id)
            + self.fixed_up(server, session, content, queue_id),
            user=session.user,
            client=server.client,
        )
        reply = await self.app.delivery.deliver(submission)
        self.delivered(server, submission, len(content), reply)
        return reply

    async def over_quota(
        self, server: SubmissionProtocol, session: SubmissionSession, counts: str
    ) -> str | None:
        """Reserve this message (MAIL) or recipient (RCPT) against --quota, or refuse it."""
        quotas = self.app.quotas
        assert quotas is not None
        holds = server.quota_holds
        if holds is None:
            from ofmipd.quota import Holds

            holds = server.quota_holds = Holds()
        user = session.user if session.authenticated else None
        refusal = await quotas.check(holds, counts, user, server.client.ip, server.session_id)
        if refusal is None:
            return None
        self.app.metrics.quota_exceeded(refusal.kind)
        if counts == "messages":
            server.end_quota_holds()  # MAIL refused: no transaction
        return refusal.reply

    # The steps of handle_DATA, which relay_stream.py takes too, in the same order.

    def header_refusal(
        self, server: SubmissionProtocol, session: SubmissionSession, content: bytes
    ) -> str | None:
        """--check-header-from's 550 for a forged header From/Sender, else None. Only the
        header section of `content` is read."""
        senders = self.app.senders
        if not (self.app.config.check_header_from and session.user and senders is not None):
            return None
        from ofmipd.header_from import forged_address

        forged = forged_address(content, session.user, senders)
        if forged is None:
            return None
        log.warning(
            "session %s: user %s may not use header From/Sender %s; message refused",
            server.session_id,
            printable(session.user),
            printable(forged),
        )
        return f"550 5.7.1 Header From or Sender not owned by user {session.user}"

    async def end_of_message_refusal(
        self, server: SubmissionProtocol, queue_id: str, size: int
    ) -> str | None:
        """--policy at END-OF-MESSAGE, before the message is delivered (or its final dot
        goes down to the relay): a refusal, logged, or None."""
        rcpts = server.envelope.rcpt_tos if server.envelope is not None else []
        refusal = await server.policy_refusal(
            "END-OF-MESSAGE",
            recipient=rcpts[0] if len(rcpts) == 1 else "",  # as Postfix: only if just one
            size=size,
            queue_id=queue_id,
        )
        if refusal is not None:
            log.info("session %s: message %s refused by policy", server.session_id, queue_id)
        return refusal

    def prepended(self, server: SubmissionProtocol) -> bytes:
        """The policy servers' PREPEND headers, above the Received header as Postfix
        puts them."""
        return "".join(f"{line}\r\n" for line in server.policy_headers).encode()

    def fixed_up(
        self, server: SubmissionProtocol, session: SubmissionSession, content: bytes, queue_id: str
    ) -> bytes:
        config = self.app.config
        if not (session.authenticated and (config.add_message_id or config.add_date)):
            return content
        # RFC 6409 §8. Added after the size check: SIZE is what the client sends.
        from ofmipd.fixups import fix_up

        return fix_up(
            content,
            hostname=server.hostname,
            queue_id=queue_id,
            add_message_id=config.add_message_id,
            add_date=config.add_date,
        )

    async def received(
        self, server: SubmissionProtocol, session: SubmissionSession, queue_id: str
    ) -> bytes:
        transport = server.transport
        return received_header(
            helo=session.host_name,
            client=server.client,
            reverse_name=await server.reverse_name(),
            hostname=server.hostname,
            protocol=protocol_name(
                bool(session.extended_smtp), server.tls_active, bool(session.authenticated)
            ),
            queue_id=queue_id,
            user=session.user,
            tls=tls_clause(transport.get_extra_info("ssl_object") if transport else None),
        )

    def delivered(
        self, server: SubmissionProtocol, submission: Submission, size: int, reply: str
    ) -> None:
        """The message's log line, metrics and error count, once the target answered."""
        self.app.metrics.delivery(reply)
        log.info(
            "session %s: message %s from=<%s> rcpts=%d size=%d user=%s result=%s",
            server.session_id,
            submission.queue_id,
            printable(submission.sender),
            len(submission.recipients),
            size,
            printable(submission.user or "-"),
            reply[:3],
        )
        if reply.startswith("250"):
            if server.quota_holds is not None:
                server.quota_holds.accepted = True  # charged when the transaction ends
            server.messages += 1
            server.errors = 0  # Postfix's limit counts errors "without delivering mail"
        else:
            server.our_fault = reply.startswith("4")  # the injector failed, not the client

    async def handle_exception(self, error: Exception) -> str:
        log.error("session error: %s", type(error).__name__, exc_info=error)
        return REPLY_INTERNAL
