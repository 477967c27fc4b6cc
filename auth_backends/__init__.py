"""Registry of credential stores: a kind names the module that declares it.

Each declaration (auth_backends/kinds/KIND.py, a kinds.Backend) names the
implementation module, which exposes `create(spec: BackendSpec) -> Authenticator`. Its
constructor validates what it can and raises ConfigError with the one line the admin
sees. A library missing for one backend matters only when someone configures that
backend, and says so differently from an unknown kind.

Adding a backend: one module in kinds/ with its BACKEND declaration (a small backend
keeps its create() and class there too; one that imports a heavy library puts them in
their own module, which `module=` names), its line in KINDS below, and the README table
regenerated with `python -m auth_backends --markdown`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ofmipd.config import BackendSpec
from ofmipd.errors import ConfigError

if TYPE_CHECKING:
    from auth_backends.kinds import Backend
    from ofmipd.auth import Authenticator

# kind -> the module holding its declaration, in the order --help and the README list them
KINDS = {
    "authfile": "auth_backends.kinds.authfile",
    "htpasswd": "auth_backends.kinds.htpasswd",
    "checkpassword": "auth_backends.kinds.checkpassword",
    "pam": "auth_backends.kinds.pam",
    "ldap": "auth_backends.kinds.ldap",
    "imap": "auth_backends.kinds.imap",
    "pop3": "auth_backends.kinds.pop3",
}


def declared(kind: str) -> Backend:
    if kind not in KINDS:
        raise ConfigError(f"unknown authenticator kind {kind!r}; known: {', '.join(KINDS)}")
    backend: Backend = importlib.import_module(KINDS[kind]).BACKEND
    return backend


def all_declared() -> list[Backend]:
    return [declared(kind) for kind in KINDS]


def schemes() -> dict[str, str]:
    """-R URL scheme -> kind."""
    return {scheme: backend.kind for backend in all_declared() for scheme in backend.schemes}


def kind_for_url(url: str) -> str:
    known = schemes()
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in known:
        raise ConfigError(
            f"-R {url}: unknown remote authentication scheme {scheme or '(none)'!r};"
            f" known: {', '.join(sorted(known))}"
        )
    return known[scheme]


def spec_from_flag(kind: str, value: str) -> BackendSpec:
    """A backend's flag (its kind) or -R ("remoteauth", kind from the URL's scheme)."""
    return BackendSpec(kind=kind_for_url(value) if kind == "remoteauth" else kind, arg=value)


def create(spec: BackendSpec) -> Authenticator:
    backend = declared(spec.kind)
    try:
        module = importlib.import_module(backend.module)
    except ImportError as error:
        if error.name and backend.module.startswith(error.name):
            raise ConfigError(f"{spec.kind} authenticator is not available in this build") from None
        raise ConfigError(
            f"{spec.kind} authenticator needs {backend.needs or error.name}: {error}"
        ) from None
    authenticator: Authenticator = module.create(spec)
    return authenticator


__all__ = [
    "KINDS",
    "BackendSpec",
    "create",
    "all_declared",
    "declared",
    "kind_for_url",
    "spec_from_flag",
]
