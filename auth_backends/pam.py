"""PAM authenticator: pam_authenticate and pam_acct_mgmt for one PAM service, in a worker pool.

python-pam's high-level authenticate() cannot set PAM_RHOST/PAM_RUSER, takes PAM_TTY from
the process's own terminal, answers only the first echo-off prompt, and says neither which
step failed nor which user PAM authenticated. So this module runs its own short PAM
transaction with python-pam's ctypes bindings and structures (pam.__internals): one handle
per call, because PAM handles are not thread-safe, and no pam_setcred/pam_open_session,
because SMTP AUTH opens no login session.

A module may change PAM_USER (case folding, aliases, realm stripping), so an accepted login
returns PAM_USER as it stands after pam_acct_mgmt: that is who the stack authenticated.
"""

from __future__ import annotations

import logging
import os
import re
from ctypes import (
    CDLL,
    POINTER,
    byref,
    c_char_p,
    c_int,
    c_size_t,
    c_void_p,
    cast,
    memmove,
    sizeof,
    string_at,
)
from ctypes.util import find_library
from typing import Any

from pam.__internals import (  # python-pam
    PAM_DISALLOW_NULL_AUTHTOK,
    PAM_ERROR_MSG,
    PAM_PROMPT_ECHO_OFF,
    PAM_PROMPT_ECHO_ON,
    PAM_RHOST,
    PAM_RUSER,
    PAM_TEXT_INFO,
    PAM_TTY,
    PAM_USER,
    PamAuthenticator,
    PamConv,
    PamHandle,
    PamMessage,
    PamResponse,
    conv_func,
)

from auth_backends.kinds import PAM as BACKEND
from ofmipd.auth import Outcome, Secret, accept, reject, tempfail
from ofmipd.config import BackendSpec
from ofmipd.errors import ConfigError
from ofmipd.identity import ClientIdentity
from ofmipd.logs import printable
from ofmipd.offload import Offload

log = logging.getLogger("ofmipd.pam")

# Linux-PAM return codes (<security/_pam_types.h>); python-pam mixes them with item numbers.
CODE_NAMES = {
    0: "PAM_SUCCESS", 1: "PAM_OPEN_ERR", 2: "PAM_SYMBOL_ERR", 3: "PAM_SERVICE_ERR",
    4: "PAM_SYSTEM_ERR", 5: "PAM_BUF_ERR", 6: "PAM_PERM_DENIED", 7: "PAM_AUTH_ERR",
    8: "PAM_CRED_INSUFFICIENT", 9: "PAM_AUTHINFO_UNAVAIL", 10: "PAM_USER_UNKNOWN",
    11: "PAM_MAXTRIES", 12: "PAM_NEW_AUTHTOK_REQD", 13: "PAM_ACCT_EXPIRED",
    14: "PAM_SESSION_ERR", 15: "PAM_CRED_UNAVAIL", 16: "PAM_CRED_EXPIRED", 17: "PAM_CRED_ERR",
    18: "PAM_NO_MODULE_DATA", 19: "PAM_CONV_ERR", 20: "PAM_AUTHTOK_ERR",
    21: "PAM_AUTHTOK_RECOVERY_ERR", 22: "PAM_AUTHTOK_LOCK_BUSY", 23: "PAM_AUTHTOK_DISABLE_AGING",
    24: "PAM_TRY_AGAIN", 25: "PAM_IGNORE", 26: "PAM_ABORT", 27: "PAM_AUTHTOK_EXPIRED",
    28: "PAM_MODULE_UNKNOWN", 29: "PAM_BAD_ITEM", 30: "PAM_CONV_AGAIN", 31: "PAM_INCOMPLETE",
}  # fmt: skip
PAM_SUCCESS, PAM_BUF_ERR, PAM_CONV_ERR = 0, 5, 19
# Codes that are PAM's answer about this user; everything else is an outage or a bug in
# the stack, and the client must hear "try later" because the store might have said yes.
REJECTING_NAMES = (
    "PAM_AUTH_ERR", "PAM_USER_UNKNOWN", "PAM_PERM_DENIED", "PAM_ACCT_EXPIRED",
    "PAM_NEW_AUTHTOK_REQD", "PAM_MAXTRIES", "PAM_CRED_INSUFFICIENT",
)  # fmt: skip
REJECTING = frozenset(code for code, name in CODE_NAMES.items() if name in REJECTING_NAMES)

TTY = "smtp"  # some modules (pam_securetty, pam_access without RHOST) want a PAM_TTY
SERVICE_DIRS = ("/etc/pam.d", "/usr/lib/pam.d")  # where this libpam looks, in order
_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*\Z")

_libc = CDLL(None)  # our own handle, so argtypes set here do not touch python-pam's
_free = _libc.free
_free.argtypes = [c_void_p]
_free.restype = None
_calloc = _libc.calloc  # not python-pam's, which exists only once a PamAuthenticator does
_calloc.argtypes = [c_size_t, c_size_t]
_calloc.restype = c_void_p
_pam_get_item: Any = None  # libpam's, bound on first use (python-pam does not wrap it)


def outcome_for(step: str, code: int, text: str) -> Outcome:
    """Map one PAM return code onto the three-way verdict; `text` is pam_strerror's."""
    reason = f"{step} {CODE_NAMES.get(code, f'PAM code {code}')}: {text}"
    if code in REJECTING:
        return reject(reason)
    return tempfail(reason)


def pam_transaction(service: str, user: str, password: bytes, rhost: str) -> Outcome:
    """Blocking: pam_start, set items, pam_authenticate, pam_acct_mgmt, pam_end."""
    PamAuthenticator._ensure_libs()  # loads libpam once, shared and immutable afterwards
    lib = PamAuthenticator
    user_bytes = user.encode("utf-8")
    converse = _conversation(service, user, user_bytes, password)  # alive until pam_end
    conversation = PamConv(converse, None)
    handle = PamHandle()
    code = lib.pam_start(service.encode(), user_bytes, byref(conversation), byref(handle))
    if code != PAM_SUCCESS or not handle.handle:
        code = code or PAM_BUF_ERR
        return outcome_for("pam_start", code, _strerror(handle, code))
    step = "pam_set_item"
    try:
        # Modules such as pam_access and pam_faillock look at who is really asking.
        items = {PAM_RUSER: user, PAM_TTY: TTY}
        if rhost:
            items[PAM_RHOST] = rhost
        for item, value in items.items():
            code = lib.pam_set_item(handle, item, c_char_p(value.encode("utf-8")))
            if code != PAM_SUCCESS:
                break
        else:
            # DISALLOW_NULL_AUTHTOK: an empty password field must not let any password in
            # (pam_unix's nullok in Debian's common-auth would otherwise accept it).
            step = "pam_authenticate"
            code = lib.pam_authenticate(handle, PAM_DISALLOW_NULL_AUTHTOK)
            if code == PAM_SUCCESS:
                # Locked, expired or access-denied accounts fail here, not in authenticate.
                step = "pam_acct_mgmt"
                code = lib.pam_acct_mgmt(handle, PAM_DISALLOW_NULL_AUTHTOK)
        if code == PAM_SUCCESS:
            return authenticated_user(handle)
        return outcome_for(step, code, _strerror(handle, code))
    finally:
        lib.pam_end(handle, code)


def authenticated_user(handle: PamHandle) -> Outcome:
    """ACCEPT with PAM_USER as the stack left it (before pam_end frees it)."""
    global _pam_get_item
    if _pam_get_item is None:
        function = CDLL(find_library("pam") or "libpam.so.0").pam_get_item  # our own handle
        function.argtypes = [PamHandle, c_int, POINTER(c_void_p)]
        function.restype = c_int
        _pam_get_item = function
    item = c_void_p()
    code = _pam_get_item(handle, PAM_USER, byref(item))
    if code != PAM_SUCCESS or not item.value:
        # Authenticated, but as whom? Never fall back to the name as typed.
        return tempfail(f"pam_get_item(PAM_USER) {CODE_NAMES.get(code, code)} after success")
    raw = string_at(item.value)
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        return tempfail("PAM_USER after success is not UTF-8")
    return accept("pam_authenticate and pam_acct_mgmt succeeded", name)


def _strerror(handle: PamHandle, code: int) -> str:
    text: bytes | None = PamAuthenticator.pam_strerror(handle, code)
    return (text or b"").decode("utf-8", "replace")


def _conversation(service: str, user: str, user_bytes: bytes, password: bytes) -> Any:
    """The PAM conversation: echo-off prompts get the password, echo-on the user name."""
    calloc = _calloc
    shown = password.decode("utf-8", "replace")

    def say(level: int, message: bytes | None) -> None:
        text = (message or b"").decode("utf-8", "replace")
        if shown and shown in text:  # a module echoing its input must not leak it to logs
            text = text.replace(shown, "<redacted>")
        log.log(level, "PAM %s for %s: %s", service, printable(user), printable(text))

    @conv_func
    def converse(count: int, messages: Any, p_response: Any, _appdata: Any) -> int:
        allocated: list[int] = []
        try:
            address = calloc(count, sizeof(PamResponse))
            if not address:
                return PAM_BUF_ERR
            allocated.append(address)
            responses = cast(address, POINTER(PamResponse))
            for i in range(count):
                message: PamMessage = messages[i].contents
                if message.msg_style == PAM_PROMPT_ECHO_OFF:
                    answer = password
                elif message.msg_style == PAM_PROMPT_ECHO_ON:
                    answer = user_bytes
                elif message.msg_style == PAM_ERROR_MSG:
                    say(logging.WARNING, message.msg)
                    continue
                elif message.msg_style == PAM_TEXT_INFO:
                    say(logging.INFO, message.msg)
                    continue
                else:  # binary prompts and the like: nothing sensible to answer
                    log.warning("PAM %s: unsupported message style %d", service, message.msg_style)
                    raise _Abandon
                # PAM frees (and wipes) each answer and the array: they must come from malloc.
                copy = calloc(len(answer) + 1, 1)
                if not copy:
                    raise _Abandon
                allocated.append(copy)
                memmove(copy, answer, len(answer))
                responses[i].resp = copy
            p_response[0] = responses
            return PAM_SUCCESS
        except Exception as error:
            # An exception escaping a ctypes callback would make it return 0, PAM_SUCCESS.
            if not isinstance(error, _Abandon):
                log.error("PAM %s: conversation failed", service, exc_info=True)
            for address in reversed(allocated):
                _free(address)
            return PAM_CONV_ERR

    return converse


class _Abandon(Exception):
    """Give up the conversation with PAM_CONV_ERR."""


class PamAuth:
    name = "pam"

    def __init__(self, service: str, workers: int = 4, timeout: float = 10.0) -> None:
        self.service = service
        self.target = f"PAM service {service}"
        # `timeout` bounds the wait for a free worker; a module hanging inside a call is
        # bounded by the chain's own timeout, and its worker stays busy until PAM returns.
        self.offload = Offload("pam", workers=workers, max_queue_age=timeout)

    async def verify(self, user: str, secret: Secret, client: ClientIdentity) -> Outcome:
        return await self.offload.run(
            pam_transaction, self.service, user, secret.reveal(), client.ip
        )

    async def close(self) -> None:
        self.offload.close()


def create(spec: BackendSpec) -> PamAuth:
    settings = BACKEND.settings(spec)
    service, where = settings["service"], settings.where
    if not _SERVICE_NAME.match(service):
        raise settings.error('service must be a PAM service name like "ofmipd"')
    # Linux-PAM silently falls back to the "other" service for a missing file, so a typo
    # would quietly authenticate against whatever "other" allows.
    if os.path.isdir(SERVICE_DIRS[0]) and not any(
        os.path.isfile(os.path.join(d, service)) for d in SERVICE_DIRS
    ):
        raise ConfigError(f"{where}: no PAM service file {SERVICE_DIRS[0]}/{service}")
    return PamAuth(service, settings["workers"], settings["timeout"])
