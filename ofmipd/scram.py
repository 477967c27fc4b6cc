"""SCRAM-SHA-256, SCRAM-SHA-1 and SCRAM-SHA-256-PLUS (RFC 5802, 7677) through `scramp`.

Imported only when a client picks a SCRAM mechanism or a store derives SCRAM keys:
scramp pulls in asn1crypto, which no other login should pay for. The exchange talks to
the client through one callable (`Ask`: send a challenge, get the decoded answer), so no
SMTP detail is in here, and it answers the Chain with an Outcome like any backend.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from scramp import ScramMechanism
from scramp.core import CBindData
from scramp.utils import ScramException, ServerError

from ofmipd.auth import Outcome, ScramKeys, accept, reject
from ofmipd.scram_salts import salt_for

END_POINT = "tls-server-end-point"  # RFC 5929; tls-unique is never offered (TLS 1.3 lacks it)
ITERATIONS = 4096  # RFC 7677's minimum, and what Dovecot and GNU SASL use by default

# Sends a challenge (bytes) and returns the client's decoded answer; raises to end AUTH.
Ask = Callable[[bytes], Awaitable[bytes]]


def hash_of(mechanism: str) -> str:
    """SCRAM-SHA-256-PLUS -> SHA-256."""
    return mechanism.removeprefix("SCRAM-").removesuffix("-PLUS")


def derive_keys(password: str, hash_name: str, salt: bytes, label: str | None) -> ScramKeys:
    """Stored keys from a plaintext (SASLprep'd by scramp, as the client does); ValueError
    if SASLprep refuses the password."""
    try:
        mechanism = ScramMechanism(f"SCRAM-{hash_name}")
        salt, stored_key, server_key, iterations = mechanism.make_auth_info(
            password, iteration_count=ITERATIONS, salt=salt
        )
    except ScramException as error:
        raise ValueError(str(error)) from None
    return ScramKeys(salt, iterations, stored_key, server_key, label)


def end_point_hash(certificate_der: bytes) -> bytes:
    """RFC 5929 tls-server-end-point: the certificate's hash by its signature's hash
    algorithm, SHA-256 in place of MD5 and SHA-1."""
    return CBindData.from_der(certificate_der).data


def _fake_keys(user: str) -> tuple[bytes, bytes, bytes, int]:
    # The salt a derived-keys user would get (ofmipd.scram_salts): nothing tells them apart.
    return salt_for(user), os.urandom(32), os.urandom(32), ITERATIONS


class ScramExchange:
    """One SCRAM exchange after the client-first message.

    `binding` is the tls-server-end-point data when -PLUS was offered on this session:
    then scramp refuses a client that says it could bind but thinks we cannot ('y'),
    which is RFC 5802's downgrade protection. `final_in_235` says where the server-final
    message goes: in the 235 reply, or in a last 334 the client answers empty.
    """

    __slots__ = ("mechanism", "first", "user", "binding", "final_in_235", "server_final")

    def __init__(
        self, mechanism: str, first: str, user: str, binding: bytes | None, final_in_235: bool
    ) -> None:
        self.mechanism = mechanism
        self.first = first  # the client-first message, gs2 header included
        self.user = user
        self.binding = binding
        self.final_in_235 = final_in_235
        self.server_final = b""  # set on success when it goes in the 235

    @property
    def hash_name(self) -> str:
        return hash_of(self.mechanism)

    async def prove(
        self, candidates: Sequence[ScramKeys], ask: Ask
    ) -> tuple[Outcome, ScramKeys | None]:
        """Run the exchange against the first candidate's salt; the proof may match any
        candidate (they share that salt and iteration count: see auth.scram_candidates).
        No candidates: an unknown user, answered with a stable fake salt. Returns the
        outcome and the candidate that accepted (None unless it did)."""
        first = candidates[0] if candidates else None
        auth_info = (
            (first.salt, first.stored_key, first.server_key, first.iterations)
            if first is not None
            else _fake_keys(self.user)
        )
        try:
            server = self._server(auth_info)
            server.set_client_first(self.first)
            server_first = server.get_server_first()
        except ScramException as error:
            return reject(f"{self.mechanism}: {_why(error)}"), None
        final = await ask(server_first.encode())
        try:
            text = final.decode("utf-8")
            keys, server = self._matching(server, server_first, text, candidates)
        except (ScramException, UnicodeDecodeError) as error:
            return reject(f"{self.mechanism}: {_why(error)}"), None
        if keys.refusal is not None:  # the right password, from where it may not be used
            return reject(f"{self.mechanism}: {keys.refusal}"), None
        server_final = server.get_server_final().encode()
        if self.final_in_235:
            self.server_final = server_final
        elif await ask(server_final):
            return reject(f"{self.mechanism}: data after the server-final message"), None
        label = f" (app password {keys.label!r})" if keys.label else ""
        return accept(f"{self.mechanism} proof matches{label}", keys.user), keys

    def _server(self, auth_info: tuple[bytes, bytes, bytes, int], nonce: str | None = None) -> Any:
        channel = (END_POINT, self.binding) if self.binding is not None else None
        return ScramMechanism(self.mechanism).make_server(
            lambda _name: auth_info, channel_binding=channel, s_nonce=nonce
        )

    def _matching(
        self, server: Any, server_first: str, final: str, candidates: Sequence[ScramKeys]
    ) -> tuple[ScramKeys, Any]:
        """The candidate the client-final proves, with the scramp server that checked it;
        ScramException (proof mismatch, or what the first check found) when none does.
        Each further candidate is a scramp server replaying the same server-first (same
        nonce, salt and count), so scramp does every check: nothing is hand-written."""
        try:
            server.set_client_final(final)
        except ScramException as error:
            if error.server_error != ServerError.INVALID_PROOF or not candidates:
                raise
            mismatch = error
        else:
            return candidates[0], server
        for keys in candidates[1:]:
            info = (keys.salt, keys.stored_key, keys.server_key, keys.iterations)
            other = self._server(info, str(server.s_nonce))
            other.set_client_first(self.first)
            if other.get_server_first() != server_first:  # not the same salt: cannot match
                continue
            try:
                other.set_client_final(final)
            except ScramException as error:
                if error.server_error != ServerError.INVALID_PROOF:
                    raise
                continue
            return keys, other
        raise mismatch


_WHY = {
    ServerError.INVALID_PROOF: "proof mismatch",
    ServerError.SERVER_DOES_SUPPORT_CHANNEL_BINDING: (
        "client did not bind the channel though -PLUS was offered (possible downgrade)"
    ),
    ServerError.CHANNEL_BINDING_NOT_SUPPORTED: "client asked for channel binding without TLS",
    ServerError.UNSUPPORTED_CHANNEL_BINDING_TYPE: f"unsupported channel binding (only {END_POINT})",
    ServerError.CHANNEL_BINDINGS_DONT_MATCH: "channel binding data does not match this TLS session",
}


def _why(error: Exception) -> str:
    """The admin's reason; scramp's own text quotes nothing secret, but its codes read
    better in a log line than its sentences."""
    if isinstance(error, ScramException) and error.server_error in _WHY:
        return _WHY[error.server_error]
    if isinstance(error, UnicodeDecodeError):
        return "malformed client-final message (not UTF-8)"
    return f"malformed message ({error.args[0] if error.args else type(error).__name__})"
