"""Server TLS contexts (TLS 1.2 minimum, modern ciphers, a certificate chain and key), and
how a failed handshake is named in the log."""

from __future__ import annotations

import os
import ssl
import weakref

from ofmipd.errors import ConfigError

# Mozilla "intermediate" TLS 1.2 suites; TLS 1.3 suites are OpenSSL's defaults.
MODERN_TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)


def server_context(cert: str | None, key: str | None, ciphers: str | None) -> ssl.SSLContext:
    if not cert:
        raise ConfigError("TLS needs --ssl-cert FILE")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.set_ciphers(ciphers or MODERN_TLS12_CIPHERS)
    except ssl.SSLError:
        raise ConfigError(f"--ciphers {ciphers!r}: OpenSSL accepts none of these") from None
    for path in (cert, key):
        if path and not os.path.isfile(path):
            raise ConfigError(f"TLS certificate or key {path}: no such file")
    try:
        context.load_cert_chain(cert, key or None)
    except (ssl.SSLError, OSError) as error:
        where = f"{cert}" + (f" / {key}" if key else "")
        raise ConfigError(f"TLS certificate {where}: cannot load ({error})") from None
    _remember_certificate(context, cert)
    return context


# context -> its leaf certificate (DER), read at start-up while the file is readable, for
# SCRAM-*-PLUS's tls-server-end-point binding (Python's SSLObject cannot give our own).
_CERTIFICATES: weakref.WeakKeyDictionary[ssl.SSLContext, bytes] = weakref.WeakKeyDictionary()
_PEM_BEGIN, _PEM_END = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"


def _remember_certificate(context: ssl.SSLContext, cert: str) -> None:
    with open(cert, encoding="ascii", errors="replace") as file:
        text = file.read()
    start = text.find(_PEM_BEGIN)
    end = text.find(_PEM_END, start)
    if start >= 0 and end > start:  # load_cert_chain took the same first block
        _CERTIFICATES[context] = ssl.PEM_cert_to_DER_cert(text[start : end + len(_PEM_END)])


def certificate_der(context: ssl.SSLContext) -> bytes | None:
    return _CERTIFICATES.get(context)


def handshake_failure(error: BaseException | None, *, timed_out: bool) -> str:
    """Why a TLS handshake failed, as one word for the session's end line: OpenSSL's
    reason (WRONG_VERSION_NUMBER, HTTP_REQUEST, NO_SHARED_CIPHER, ...), "timeout" or
    "closed" (the client went away). Never a traceback: a port scanner, a health check
    or plaintext sent to port 465 is routine, not an error in ofmipd."""
    if timed_out or isinstance(error, ConnectionAbortedError):  # asyncio's handshake timeout
        return "timeout"
    if isinstance(error, ssl.SSLError):
        return error.reason or type(error).__name__
    if error is None or isinstance(error, ConnectionError | EOFError):
        return "closed"
    return type(error).__name__
