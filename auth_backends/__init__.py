"""Registry of credential stores: each kind's declaration names its implementation.

The declarations (auth_backends/kinds.py) are the registry: their order is the order of
--help and the README. Each names its implementation module, which exposes
`create(spec: BackendSpec) -> Authenticator`; its constructor validates what it can and
raises ConfigError with the one line the admin sees. A library missing for one backend
matters only when someone configures that backend, and says so differently from an
unknown kind.

Adding a backend: its implementation module, its `Backend(...)` declaration in kinds.py
(added to DECLARED), and the README table regenerated with
`python -m auth_backends --markdown` (a test fails until it is).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from auth_backends.kinds import BY_KIND, DECLARED, Backend
from ofmipd.config import BackendSpec
from ofmipd.errors import ConfigError

if TYPE_CHECKING:
    from ofmipd.auth import Authenticator


def declared(kind: str) -> Backend:
    if kind not in BY_KIND:
        raise ConfigError(f"unknown authenticator kind {kind!r}; known: {', '.join(BY_KIND)}")
    return BY_KIND[kind]


def all_declared() -> tuple[Backend, ...]:
    return DECLARED


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
    "BackendSpec",
    "create",
    "all_declared",
    "declared",
    "kind_for_url",
    "spec_from_flag",
]
