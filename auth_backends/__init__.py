"""Registry of credential stores: a kind or URL scheme names a lazily imported module.

Each backend module exposes `create(spec: BackendSpec) -> Authenticator`. Its
constructor validates what it can and raises ConfigError with the one line the
admin sees. A library missing for one backend matters only when someone
configures that backend, and says so differently from an unknown kind.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from ofmipd.auth import Authenticator
from ofmipd.errors import ConfigError

# kind -> (module, what it needs that may be missing, a one-line description for --help)
KINDS: dict[str, tuple[str, str, str]] = {
    "authfile": ("auth_backends.authfile", "", "-a FILE: user:password lines (mode 0400/0600)"),
    "htpasswd": ("auth_backends.htpasswd", "libpass", "--htpasswd FILE: Apache htpasswd file"),
    "checkpassword": ("auth_backends.checkpassword", "", '-A "PROG ARGS": DJB checkpassword'),
    "pam": ("auth_backends.pam", "python-pam", "-m SERVICE: PAM service"),
    "ldap": ("auth_backends.ldap", "python-ldap", "-R ldap[s]://HOST/DN-TEMPLATE"),
    "imap": ("auth_backends.imap", "", "-R imap[s]://HOST[:PORT]: remote IMAP login"),
    "pop3": ("auth_backends.pop3", "", "-R pop3[s]://HOST[:PORT] or apop://: remote POP3 login"),
}

# -R URL scheme -> kind
SCHEMES = {
    "ldap": "ldap",
    "ldaps": "ldap",
    "imap": "imap",
    "imaps": "imap",
    "pop3": "pop3",
    "pop3s": "pop3",
    "apop": "pop3",
}


class BackendSpec(NamedTuple):
    """One configured backend: from a flag (`arg`) or a TOML [[auth]] table (`options`)."""

    kind: str
    arg: str | None = None  # the flag's value, e.g. the -R URL or -A command line
    options: Mapping[str, Any] = MappingProxyType({})  # shared, so read-only

    def describe(self) -> str:
        return f"{self.kind} {self.arg}" if self.arg else self.kind


def kind_for_url(url: str) -> str:
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in SCHEMES:
        raise ConfigError(
            f"-R {url}: unknown remote authentication scheme {scheme or '(none)'!r};"
            f" known: {', '.join(sorted(SCHEMES))}"
        )
    return SCHEMES[scheme]


def create(spec: BackendSpec) -> Authenticator:
    if spec.kind not in KINDS:
        raise ConfigError(f"unknown authenticator kind {spec.kind!r}; known: {', '.join(KINDS)}")
    module_name, needs, _ = KINDS[spec.kind]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        if error.name and module_name.startswith(error.name):
            raise ConfigError(f"{spec.kind} authenticator is not available in this build") from None
        raise ConfigError(
            f"{spec.kind} authenticator needs {needs or error.name}: {error}"
        ) from None
    backend: Authenticator = module.create(spec)
    return backend
