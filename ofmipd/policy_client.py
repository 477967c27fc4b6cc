"""The Postfix SMTP access policy delegation client (--policy, [[policy]]).

Postfix's protocol (SMTPD_POLICY_README): the client sends name=value lines and an
empty line, the server answers action=... and an empty line, on a connection that is
kept for the next request. The action is read as access(5) defines it. Each service is
asked in order and the first answer other than DUNNO decides, as in Postfix's
restriction lists; a service that is down, slow or talks nonsense gets the default
action (451 4.3.5, as Postfix's smtpd_policy_service_default_action).

Only configurations with --policy import this module. (ofmipd/policy.py is the
per-connection ClientPolicy, an older and unrelated name.)
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

from ofmipd.errors import ConfigError
from ofmipd.logs import printable

log = logging.getLogger("ofmipd.policy")

DEFAULT_ACTION = "451 4.3.5 Server configuration problem"  # Postfix's default
# Postfix waits 100s (smtpd_policy_service_timeout), but a person's mail client is
# waiting here, and a lookup in a healthy policy daemon takes milliseconds: after 10s
# the client is better served by the default action's "try again later".
DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_IDLE = 300.0  # Postfix's smtpd_policy_service_max_idle
DEFAULT_MAX_TTL = 1000.0  # Postfix's smtpd_policy_service_max_ttl
REPLY_LIMIT = 4096  # octets of one reply; longer is a broken or hostile server
REPLY_TEXT_LIMIT = 998  # an action's characters: an SMTP reply or header line at most
IDLE_PER_SERVICE = 16  # idle connections kept per service

# access(5) actions ofmipd cannot carry out: the message is not queued here.
UNSUPPORTED = frozenset({"HOLD", "DISCARD", "REDIRECT", "BCC", "FILTER"})
_NUMERIC = re.compile(r"([45])(\d\d)(?:[ -](.*))?\Z", re.S)
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?: |\Z)")
# RFC 5322 2.2: a field name is printable ASCII but ':'; one line, at most 998 octets.
_HEADER = re.compile(r"[!-9;-~]+:[ \t]?[ -~\t]*\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
OPTIONS = ("service", "timeout", "default_action", "at_mail", "max_idle", "max_ttl")
_NUMBER = (int, float)
_OPTION_TYPES: tuple[tuple[str, Any, str], ...] = (
    ("timeout", _NUMBER, "a number"), ("max_idle", _NUMBER, "a number"),
    ("max_ttl", _NUMBER, "a number"), ("at_mail", bool, "true or false"),
    ("default_action", str, "a string"),
)  # fmt: skip


class PolicyFailure(Exception):
    """The service could not be asked or answered nonsense: the default action applies."""


class Action:
    """One access(5) action, read. kind is one of: permit, dunno, reply, defer_if_permit,
    defer_if_reject, prepend, log, unsupported, garbage."""

    __slots__ = ("kind", "reply", "text")

    def __init__(self, kind: str, reply: str = "", text: str = "") -> None:
        self.kind = kind
        self.reply = reply  # the SMTP reply line, for kinds that refuse
        self.text = text  # the header (prepend) or the text to log

    def __repr__(self) -> str:
        return f"Action({self.kind!r}, {self.reply!r}, {self.text!r})"


def _smtp_reply(code: str, text: str, default_dsn: str) -> str:
    text = text.strip()
    if not (_ENHANCED.match(text) and text[0] == code[0]):  # RFC 3463: the classes agree
        text = f"{default_dsn} {text}".rstrip()
    return f"{code} {text}"


def parse_action(action: str) -> Action:
    """An access(5) action as a policy server answers it (case does not matter)."""
    whole = action.strip()
    if _CONTROL.search(whole) or len(whole) > REPLY_TEXT_LIMIT:
        return Action("garbage")  # it would end or break the SMTP reply line it becomes
    word, _, rest = whole.partition(" ")
    rest = rest.strip()
    keyword = word.upper()
    if keyword == "OK" or (whole.isascii() and whole.isdigit() and not _NUMERIC.match(whole)):
        return Action("permit")
    if keyword == "DUNNO":
        return Action("dunno")
    if keyword in ("INFO", "WARN"):
        return Action("log", text=f"{keyword} {rest}".rstrip())
    if keyword == "REJECT":
        return Action("reply", _smtp_reply("554", rest or "Access denied", "5.7.1"))
    if keyword == "DEFER":
        return Action("reply", _smtp_reply("450", rest or "Try again later", "4.7.1"))
    if keyword in ("DEFER_IF_PERMIT", "DEFER_IF_REJECT"):
        reply = _smtp_reply("450", rest or "Try again later", "4.7.1")
        return Action(keyword.lower(), reply)
    if keyword == "PREPEND":
        return Action("prepend", text=rest)  # checked where it is used: _action
    numeric = _NUMERIC.match(whole)
    if numeric:
        first, digits, text = numeric.groups()
        return Action("reply", _smtp_reply(first + digits, text or "", f"{first}.7.1"))
    if keyword in UNSUPPORTED:
        return Action("unsupported", text=keyword)
    return Action("garbage")


def parse_service(text: str) -> tuple[str, str, int]:
    """inet:HOST:PORT (HOST may be [IPv6]) or unix:PATH, as Postfix writes them:
    ("inet", host, port) or ("unix", path, 0)."""
    kind, sep, rest = text.partition(":")
    if sep and kind == "unix" and rest:
        return "unix", rest, 0
    if sep and kind == "inet":
        host, _, port = rest.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if host and port.isascii() and port.isdigit() and 0 < int(port) < 65536:
            return "inet", host, int(port)
    raise ConfigError(f"--policy {text!r}: expected inet:HOST:PORT or unix:PATH")


def encode_request(attributes: Mapping[str, object]) -> bytes:
    """name=value lines and the empty line. Postfix's smtpd never lets a control character
    into these values (it refuses them in commands); ofmipd replaces any that reached here
    with '?', as Postfix's printable() does, so no value can end a line and add an
    attribute or end the request."""
    lines = []
    for name, value in attributes.items():
        text = "" if value is None else str(value)
        if _CONTROL.search(text):
            text = _CONTROL.sub("?", text)
        lines.append(f"{name}={text}\n")
    lines.append("\n")
    return "".join(lines).encode("utf-8", "replace")


class _Connection:
    __slots__ = ("reader", "writer", "opened", "used")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.opened = self.used = time.monotonic()

    def close(self) -> None:
        self.writer.close()


class PolicyService:
    """One policy server, with its idle connections (each session asks on its own
    connection, so a slow answer delays only the session waiting for it)."""

    __slots__ = (
        "name", "kind", "where", "port", "timeout", "default_action", "at_mail",
        "max_idle", "max_ttl", "idle",
    )  # fmt: skip

    def __init__(
        self,
        name: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        default_action: str = DEFAULT_ACTION,
        at_mail: bool = False,
        max_idle: float = DEFAULT_MAX_IDLE,
        max_ttl: float = DEFAULT_MAX_TTL,
    ) -> None:
        self.name = name
        self.kind, self.where, self.port = parse_service(name)
        for what, number in (("timeout", timeout), ("max_idle", max_idle), ("max_ttl", max_ttl)):
            if not number > 0:
                raise ConfigError(f"policy {name}: {what} must be positive")
        self.timeout = timeout
        if parse_action(default_action).kind not in ("permit", "dunno", "reply"):
            raise ConfigError(
                f"policy {name}: default action {default_action!r} must be DUNNO, OK, "
                "REJECT, DEFER or a 4NN/5NN reply"
            )
        self.default_action = default_action
        self.at_mail = at_mail
        self.max_idle = max_idle
        self.max_ttl = max_ttl
        self.idle: list[_Connection] = []

    def describe(self) -> str:
        return (
            f"{self.name} (timeout {self.timeout:g}s, default action {self.default_action!r}, "
            f"asked at {'MAIL, ' if self.at_mail else ''}RCPT and END-OF-MESSAGE, connections "
            f"kept {self.max_idle:g}s idle and {self.max_ttl:g}s in all)"
        )

    async def ask(self, request: bytes) -> str:
        """The action the server answers, or raises PolicyFailure."""
        try:
            return await asyncio.wait_for(self._ask(request), self.timeout)
        except TimeoutError:
            raise PolicyFailure(f"no answer within {self.timeout:g}s") from None
        except (OSError, asyncio.IncompleteReadError, ValueError) as error:
            raise PolicyFailure(str(error) or type(error).__name__) from None

    async def _ask(self, request: bytes) -> str:
        connection = self._take_idle()
        if connection is not None:
            try:
                return await self._exchange(connection, request)
            except (OSError, asyncio.IncompleteReadError):
                # The server closed a kept connection (its own idle limit, a restart):
                # one new connection, as Postfix retries.
                pass
        if self.kind == "unix":
            reader, writer = await asyncio.open_unix_connection(self.where, limit=REPLY_LIMIT)
        else:
            reader, writer = await asyncio.open_connection(self.where, self.port, limit=REPLY_LIMIT)
        return await self._exchange(_Connection(reader, writer), request)

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self.idle:
            connection = self.idle.pop()
            if now - connection.used < self.max_idle and now - connection.opened < self.max_ttl:
                return connection
            connection.close()
        return None

    async def _exchange(self, connection: _Connection, request: bytes) -> str:
        kept = False
        try:
            connection.writer.write(request)
            await connection.writer.drain()
            action = await _read_reply(connection.reader)
            connection.used = time.monotonic()
            if len(self.idle) < IDLE_PER_SERVICE:
                self.idle.append(connection)
                kept = True
            return action
        finally:
            if not kept:  # failed, cancelled by the timeout, or too many idle
                connection.close()

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


async def _read_reply(reader: asyncio.StreamReader) -> str:
    """The action= of one reply; ValueError for a reply that is too long or lacks it."""
    action = None
    size = 0
    while True:
        line = await reader.readline()  # ValueError past REPLY_LIMIT
        if not line.endswith(b"\n"):
            raise asyncio.IncompleteReadError(line, None)
        size += len(line)
        if size > REPLY_LIMIT:
            raise ValueError(f"reply longer than {REPLY_LIMIT} octets")
        line = line.rstrip(b"\r\n")
        if not line:
            break
        name, sep, value = line.partition(b"=")
        if sep and name == b"action" and action is None:
            action = value.decode("utf-8", "replace")
    if action is None:
        raise ValueError("reply without action=")
    return action


class PolicyDecision:
    """What the services decided at one stage: a refusal (reply) or None, and headers."""

    __slots__ = ("reply", "prepend")

    def __init__(self, reply: str | None = None, prepend: tuple[str, ...] = ()) -> None:
        self.reply = reply
        self.prepend = prepend

    @property
    def disconnect(self) -> bool:
        return self.reply is not None and self.reply[:3] in ("421", "521")


class PolicyClients:
    """The --policy services in order, asked as one restriction list."""

    __slots__ = ("services",)

    def __init__(self, services: tuple[PolicyService, ...]) -> None:
        self.services = services

    @property
    def at_mail(self) -> bool:
        return any(service.at_mail for service in self.services)

    def describe(self) -> list[str]:
        return [f"  {n}. {s.describe()}" for n, s in enumerate(self.services, 1)]

    def close(self) -> None:
        for service in self.services:
            service.close()

    async def check(self, attributes: Mapping[str, object], session: str) -> PolicyDecision:
        """Ask the services in order (at MAIL, only those with at_mail); the first
        PERMIT or refusal ends the list. DEFER_IF_PERMIT and DEFER_IF_REJECT wait for
        the end, as Postfix's do."""
        request = encode_request(attributes)
        state = str(attributes.get("protocol_state"))
        prepend: list[str] = []
        if_permit = if_reject = None
        for service in self.services:
            if state == "MAIL" and not service.at_mail:
                continue
            action = await self._action(service, request, state, session)
            if action.kind == "permit":
                break
            if action.kind == "reply":
                if if_reject is not None and action.reply.startswith("5"):
                    return PolicyDecision(if_reject, tuple(prepend))
                return PolicyDecision(action.reply, tuple(prepend))
            if action.kind == "defer_if_permit":
                if_permit = if_permit or action.reply
            elif action.kind == "defer_if_reject":
                if_reject = if_reject or action.reply
            elif action.kind == "prepend":
                prepend.append(action.text)
        return PolicyDecision(if_permit, tuple(prepend))

    async def _action(
        self, service: PolicyService, request: bytes, state: str, session: str
    ) -> Action:
        """The service's action read, with every fault turned into the default action."""
        try:
            text = await service.ask(request)
        except PolicyFailure as failure:
            log.warning(
                "session %s: policy %s at %s: %s; default action %s",
                session, service.name, state, printable(failure), service.default_action,
            )  # fmt: skip
            return parse_action(service.default_action)
        action = parse_action(text)
        unusable = _unusable_prepend(action, state)
        if unusable is not None:
            # As Postfix's smtpd_check.c: a warning, and the answer counts as DUNNO.
            log.warning(
                "session %s: policy %s at %s answered %s: %s; taken as DUNNO",
                session, service.name, state, printable(text), unusable,
            )  # fmt: skip
            return Action("dunno")
        problem = None
        if action.kind == "garbage":
            problem = "unknown or malformed action"
        elif action.kind == "unsupported":
            problem = f"{action.text} cannot be done by a submission front-end"
        if problem is not None:
            log.warning(
                "session %s: policy %s at %s answered %s: %s; default action %s",
                session, service.name, state, printable(text), problem, service.default_action,
            )  # fmt: skip
            return parse_action(service.default_action)
        if action.kind in ("log", "reply") or action.kind.startswith("defer"):
            log.info(
                "session %s: policy %s at %s: %s",
                session, service.name, state, printable(text),
            )  # fmt: skip
        return action


def _unusable_prepend(action: Action, state: str) -> str | None:
    """Why a PREPEND cannot be done, or None (also for other actions)."""
    if action.kind != "prepend":
        return None
    if not _HEADER.match(action.text):
        return "not a header"
    if state == "END-OF-MESSAGE":
        return "too late, the header is gone"
    return None


def build(specs: tuple[Any, ...], defaults: Mapping[str, Any]) -> PolicyClients:
    """The services of --policy flags and [[policy]] tables (config.BackendSpec, kind
    "policy"); `defaults` holds the --policy-* settings a table may override."""
    services = []
    for spec in specs:
        options = dict(defaults)
        options.update(spec.options)
        options["service"] = spec.arg
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"[[policy]] {spec.arg}: unknown setting {unknown[0]!r}")
        for key, kind, what in _OPTION_TYPES:
            value = options.get(key)
            # TOML's true is an int to isinstance: a bool only where a bool is wanted.
            if value is not None and (not isinstance(value, kind) or (
                isinstance(value, bool) and kind is not bool
            )):  # fmt: skip
                raise ConfigError(f"[[policy]] {spec.arg}: {key} must be {what}")
        services.append(
            PolicyService(
                str(options["service"]),
                timeout=float(options.get("timeout", DEFAULT_TIMEOUT)),
                default_action=options.get("default_action", DEFAULT_ACTION),
                at_mail=options.get("at_mail", False),
                max_idle=float(options.get("max_idle", DEFAULT_MAX_IDLE)),
                max_ttl=float(options.get("max_ttl", DEFAULT_MAX_TTL)),
            )
        )
    return PolicyClients(tuple(services))
