"""ofmipd's aiosmtpd surface, guarded: every aiosmtpd name ofmipd overrides or reads
still exists, with the signature ofmipd was written against, and aiosmtpd still calls
the hooks ofmipd relies on. A new aiosmtpd then fails here, loudly, rather than subtly
in production (the `<1.5` pin in pyproject.toml is the other half of this guard).

The names come from ofmipd's source (ast), not from a hand-kept list: a new override,
or a new read of an aiosmtpd attribute (or an ofmipd attribute whose name a new aiosmtpd
also uses), fails the first test until it is added to RECORDED with aiosmtpd's
signature. Each check is a function returning its problems, so that the tests at the
end can prove it fails on a changed aiosmtpd. tests/test_smtp_init.py checks the other
direction: that ofmipd's own __init__ sets everything aiosmtpd's sets.
"""

from __future__ import annotations

import ast
import asyncio
import functools
import inspect
from collections.abc import Iterable
from pathlib import Path

import aiosmtpd.smtp
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from ofmipd.smtp import SubmissionHandler, SubmissionProtocol

OFMIPD = Path(__file__).resolve().parent.parent / "ofmipd"
# The modules that hold a SubmissionProtocol, and the names they hold it by.
PROTOCOL_NAMES = {
    "smtp.py": {"server"},
    "auth_exchange.py": {"protocol"},
    "connection.py": {"server"},
    "listeners.py": {"server"},
    "stdio.py": {"server"},
}
# Names the session's state objects are held by, and aiosmtpd's class for each.
STATE_NAMES = {"session": Session, "session_state": Session, "envelope": Envelope}


# ---- what ofmipd uses ----------------------------------------------------------------


def _attributes_of(tree: ast.AST, holders: set[str]) -> Iterable[str]:
    """Attribute names read or set on `holder.name` (or `x.holder.name`)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            value = node.value
            if isinstance(value, ast.Name) and value.id in holders:
                yield node.attr
            elif isinstance(value, ast.Attribute) and value.attr in holders:
                yield node.attr


def _super_attributes(tree: ast.AST) -> Iterable[str]:
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name)
            and node.value.func.id == "super"
        ):
            yield node.attr


def _protocol_class(tree: ast.Module) -> ast.ClassDef:
    return next(
        node
        for node in tree.body
        if isinstance(node, ast.ClassDef) and node.name == SubmissionProtocol.__name__
    )


@functools.cache
def names_ofmipd_uses() -> frozenset[str]:
    """Every attribute name ofmipd defines on, reads from or sets on its protocol."""
    used: set[str] = set()
    for module, holders in PROTOCOL_NAMES.items():
        tree = ast.parse((OFMIPD / module).read_text())
        used.update(_attributes_of(tree, holders))
        if module == "smtp.py":
            cls = _protocol_class(tree)
            used.update(_attributes_of(cls, {"self"}))
            used.update(_super_attributes(cls))
            for node in cls.body:  # overrides and class attributes
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    used.add(node.name)
                elif isinstance(node, ast.Assign | ast.AnnAssign):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    used.update(t.id for t in targets if isinstance(t, ast.Name))
    return frozenset(used)


def state_names_ofmipd_uses() -> dict[type, set[str]]:
    """The Session and Envelope attributes ofmipd reads or sets."""
    used: dict[type, set[str]] = {cls: set() for cls in STATE_NAMES.values()}
    for module in ("smtp.py", "auth_exchange.py"):
        tree = ast.parse((OFMIPD / module).read_text())
        for holder, cls in STATE_NAMES.items():
            used[cls].update(_attributes_of(tree, {holder}))
    return used


def aiosmtpd_imports() -> set[str]:
    """The names ofmipd imports from aiosmtpd (syntax, login_always_fail, ...)."""
    names: set[str] = set()
    for path in OFMIPD.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aiosmtpd"):
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


# ---- what aiosmtpd has ------------------------------------------------------------------


@functools.cache
def _assigned_on_self(cls: type) -> set[str]:
    """Instance attributes a class sets on self anywhere in its own source."""
    tree = ast.parse(inspect.getsource(cls))
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    }


def _signature(function: object) -> inspect.Signature:
    """Names, kinds and defaults: what a call depends on. Annotations are left out, as
    their text changes with the Python version while the calls do not."""
    signature = inspect.signature(function)  # type: ignore[arg-type]
    return signature.replace(
        parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
        return_annotation=signature.empty,
    )


def describe(cls: type, name: str) -> str | None:
    """What aiosmtpd's `cls` has under `name`: a signature, a kind, or None if nothing."""
    for klass in cls.__mro__:
        if name in vars(klass):
            member = vars(klass)[name]
            if isinstance(member, property):
                return "property"
            if callable(member):
                return f"def{_signature(member)}"
            return f"class attribute {type(member).__name__}"
    if any(name in _assigned_on_self(klass) for klass in cls.__mro__ if klass is not object):
        return "instance attribute"
    return None


def describe_import(dotted: str) -> str | None:
    module, _, name = dotted.rpartition(".")
    member = getattr(__import__(module, fromlist=[name]), name, None)
    if member is None:
        return None
    if isinstance(member, type):
        return f"class{_signature(member.__init__)}"
    return f"def{_signature(member)}"


# ---- the record: aiosmtpd 1.4.6, as ofmipd was written against it ----------------------

# What aiosmtpd's SMTP has under each name ofmipd uses (describe() of it).
RECORDED: dict[str, str] = {
    "__ident__": "instance attribute",
    "__init__": "def(self, handler, *, data_size_limit=33554432, enable_SMTPUTF8=False, "
    "decode_data=False, hostname=None, ident=None, tls_context=None, "
    "require_starttls=False, timeout=300, auth_required=False, "
    "auth_require_tls=True, auth_exclude_mechanism=None, auth_callback=None, "
    "command_call_limit=None, authenticator=None, proxy_protocol_timeout=None, "
    "loop=None)",
    "_auth_callback": "instance attribute",
    "_auth_methods": "instance attribute",
    "_auth_require_tls": "instance attribute",
    "_auth_required": "instance attribute",
    "_authenticator": "instance attribute",
    "_call_handler_hook": "def(self, command, *args)",
    "_call_limit_base": "instance attribute",
    "_call_limit_default": "instance attribute",
    "_cb_client_connected": "def(self, reader, writer)",
    "_create_session": "def(self)",
    "_decode_data": "instance attribute",
    "_ehlo_hook_ver": "instance attribute",
    "_enforce_call_limit": "instance attribute",
    "_getaddr": "def(self, arg)",
    "_handle_client": "def(self)",
    "_handle_hooks": "instance attribute",
    "_handler_coroutine": "instance attribute",
    "_original_transport": "instance attribute",
    "_proxy_timeout": "instance attribute",
    "_reader": "instance attribute",
    "_reset_timeout": "def(self, duration=None)",
    "_set_post_data_state": "def(self)",
    "_set_rset_state": "def(self)",
    "_smtp_methods": "instance attribute",
    "_timeout_cb": "def(self)",
    "_timeout_duration": "instance attribute",
    "_timeout_handle": "instance attribute",
    "_tls_handshake_okay": "instance attribute",
    "_tls_protocol": "instance attribute",
    "check_helo_needed": "def(self, helo='HELO')",
    "command_size_limit": "class attribute int",
    "command_size_limits": "class attribute defaultdict",
    "connection_lost": "def(self, error)",
    "connection_made": "def(self, transport)",
    "data_size_limit": "instance attribute",
    "enable_SMTPUTF8": "instance attribute",
    "envelope": "instance attribute",
    "event_handler": "instance attribute",
    "handle_exception": "def(self, error)",
    "hostname": "instance attribute",
    "line_length_limit": "class attribute int",
    "local_part_limit": "class attribute int",
    "loop": "instance attribute",
    "push": "def(self, status)",
    "require_starttls": "instance attribute",
    "session": "instance attribute",
    "smtp_AUTH": "def(self, arg)",
    "smtp_DATA": "def(self, arg)",
    "smtp_EHLO": "def(self, hostname)",
    "smtp_HELO": "def(self, hostname)",
    "smtp_STARTTLS": "def(self, arg)",
    "tls_context": "instance attribute",
    "transport": "instance attribute",
}
RECORDED_STATE: dict[str, dict[str, str]] = {
    "Envelope": {
        "content": "instance attribute",
        "mail_from": "instance attribute",
        "mail_options": "instance attribute",
        "original_content": "instance attribute",
        "rcpt_options": "instance attribute",
        "rcpt_tos": "instance attribute",
    },
    "Session": {
        "authenticated": "instance attribute",
        "extended_smtp": "instance attribute",
        "host_name": "instance attribute",
    },
}
RECORDED_IMPORTS: dict[str, str] = {
    "aiosmtpd.smtp.Envelope": "class(self)",
    "aiosmtpd.smtp.SMTP": "class(self, handler, *, data_size_limit=33554432, "
    "enable_SMTPUTF8=False, decode_data=False, hostname=None, "
    "ident=None, tls_context=None, require_starttls=False, timeout=300, "
    "auth_required=False, auth_require_tls=True, "
    "auth_exclude_mechanism=None, auth_callback=None, "
    "command_call_limit=None, authenticator=None, "
    "proxy_protocol_timeout=None, loop=None)",
    "aiosmtpd.smtp.Session": "class(self, loop)",
    "aiosmtpd.smtp.TLSSetupException": "class(self, /, *args, **kwargs)",
    "aiosmtpd.smtp.login_always_fail": "def(mechanism, login, password)",
    "aiosmtpd.smtp.syntax": "def(text, extended=None, when=None)",
}


# ---- the checks, as functions so that the proofs below can run them on a changed aiosmtpd


def surface_problems(smtp_class: type = SMTP) -> list[str]:
    problems = []
    for name in sorted(names_ofmipd_uses()):
        now = describe(smtp_class, name)
        if name not in RECORDED:
            if now is not None:
                problems.append(f"{name}: aiosmtpd has it ({now}) but RECORDED does not")
            continue
        if now != RECORDED[name]:
            problems.append(f"{name}: ofmipd was written against {RECORDED[name]}, now {now}")
    for name in sorted(set(RECORDED) - names_ofmipd_uses()):
        problems.append(f"{name}: recorded, but ofmipd no longer uses it")
    return problems


def state_problems() -> list[str]:
    problems = []
    for cls, names in state_names_ofmipd_uses().items():
        recorded = RECORDED_STATE[cls.__name__]
        for name in sorted(names):
            now = describe(cls, name)
            if name not in recorded:
                if now is not None:
                    problems.append(f"{cls.__name__}.{name}: ({now}) not in RECORDED_STATE")
            elif now != recorded[name]:
                problems.append(f"{cls.__name__}.{name}: was {recorded[name]}, now {now}")
    return problems


def import_problems() -> list[str]:
    problems = []
    for dotted in sorted(aiosmtpd_imports()):
        now = describe_import(dotted)
        if now != RECORDED_IMPORTS.get(dotted):
            problems.append(f"{dotted}: written against {RECORDED_IMPORTS.get(dotted)}, now {now}")
    return problems


def _calls_in(tree: ast.AST) -> dict[str, set[str]]:
    """For each SMTP method in aiosmtpd's source, the `self.name` it refers to."""
    smtp = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "SMTP")
    return {
        method.name: set(_attributes_of(method, {"self"}))
        for method in smtp.body
        if isinstance(method, ast.FunctionDef | ast.AsyncFunctionDef)
    }


def overrides() -> set[str]:
    """The SMTP methods ofmipd's protocol replaces."""
    cls = _protocol_class(ast.parse((OFMIPD / "smtp.py").read_text()))
    defined = {n.name for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    return {name for name in defined if callable(vars(SMTP).get(name))} - {"__init__"}


def call_problems(source: str) -> list[str]:
    """aiosmtpd must still call each override: asyncio calls the protocol callbacks, the
    command loop dispatches smtp_* through _smtp_methods (which ofmipd's __init__ fills),
    and every other override is referred to by some other aiosmtpd method."""
    calls = _calls_in(ast.parse(source))
    problems = []
    if "_smtp_methods" not in calls.get("_handle_client", set()):
        problems.append("_handle_client no longer dispatches commands through _smtp_methods")
    for name in sorted(overrides()):
        if name.startswith("smtp_") or hasattr(asyncio.BaseProtocol, name):
            continue
        callers = {caller for caller, refs in calls.items() if name in refs and caller != name}
        if not callers:
            problems.append(f"{name}: ofmipd overrides it, but aiosmtpd never calls it")
    return problems


def _hook_calls(trees: Iterable[ast.AST]) -> dict[str, set[int]]:
    """`self._call_handler_hook("MAIL", a, b)` -> {"MAIL": {2}}: the arguments each hook gets."""
    found: dict[str, set[int]] = {}
    for node in (node for tree in trees for node in ast.walk(tree)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "_call_handler_hook"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            found.setdefault(str(node.args[0].value), set()).add(len(node.args) - 1)
    return found


def hook_problems(source: str) -> list[str]:
    """aiosmtpd still calls the handler hooks ofmipd defines, with the arguments they take:
    _call_handler_hook passes (server, session, envelope, *args)."""
    tree = ast.parse(source)
    problems = []
    hook_call = next(
        (
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.AsyncFunctionDef) and n.name == "_call_handler_hook"
        ),
        None,
    )
    passed = [
        ast.unparse(call)
        for call in ast.walk(hook_call or ast.Module())
        if isinstance(call, ast.Call) and ast.unparse(call.func) == "hook"
    ]
    if passed != ["hook(self, self.session, self.envelope, *args)"]:
        problems.append(f"_call_handler_hook calls the hook as {passed}")
    # The hooks are called by aiosmtpd's methods that ofmipd keeps, and by its own.
    replaced = overrides()
    smtp = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "SMTP")
    kept = [m for m in smtp.body if getattr(m, "name", None) not in replaced]
    calls = _hook_calls([*kept, _protocol_class(ast.parse((OFMIPD / "smtp.py").read_text()))])
    for name in sorted(n for n in vars(SubmissionHandler) if n.startswith("handle_")):
        command = name.removeprefix("handle_")
        if command == "exception":
            if "self.event_handler.handle_exception" not in source:
                problems.append("SMTP.handle_exception no longer asks the handler")
            continue
        hook = getattr(SubmissionHandler, name)
        wanted = len(inspect.signature(hook).parameters) - 4  # self, server, session, envelope
        if calls.get(command) != {wanted}:
            problems.append(
                f"{name} takes {wanted} arguments, aiosmtpd passes {calls.get(command)}"
            )
    return problems


# ---- the tests -------------------------------------------------------------------------

AIOSMTPD_SOURCE = inspect.getsource(aiosmtpd.smtp)


def test_every_aiosmtpd_name_ofmipd_uses_is_recorded_and_unchanged():
    assert surface_problems() == []


def test_session_and_envelope_attributes_are_unchanged():
    assert state_problems() == []


def test_what_ofmipd_imports_from_aiosmtpd_is_unchanged():
    assert import_problems() == []


def test_aiosmtpd_still_calls_every_override():
    assert overrides() >= {"_getaddr", "_reset_timeout", "push", "handle_exception"}
    assert call_problems(AIOSMTPD_SOURCE) == []


def test_aiosmtpd_still_calls_the_handler_hooks_with_their_arguments():
    assert hook_problems(AIOSMTPD_SOURCE) == []


# ---- proofs that the guard fails on a changed aiosmtpd ---------------------------------


def test_guard_fails_when_aiosmtpd_renames_a_member(monkeypatch):
    monkeypatch.delattr(SMTP, "_getaddr")
    assert surface_problems() == ["_getaddr: ofmipd was written against def(self, arg), now None"]


def test_guard_fails_when_aiosmtpd_changes_a_signature(monkeypatch):
    async def push(self, status, *, log=True):  # a new keyword: a different contract
        pass

    monkeypatch.setattr(SMTP, "_reset_timeout", lambda self, duration: None)
    monkeypatch.setattr(SMTP, "push", push)
    problems = surface_problems()
    assert [p.split(":")[0] for p in problems] == ["_reset_timeout", "push"], problems


def test_guard_fails_when_ofmipd_uses_a_name_it_has_not_recorded(monkeypatch):
    monkeypatch.delitem(RECORDED, "_set_rset_state")
    assert surface_problems() == [
        "_set_rset_state: aiosmtpd has it (def(self)) but RECORDED does not"
    ]


def test_guard_fails_when_aiosmtpd_grows_a_name_ofmipd_has_too(monkeypatch):
    monkeypatch.setattr(SMTP, "timer", None, raising=False)  # ofmipd's IdleTimer attribute
    assert surface_problems() == [
        "timer: aiosmtpd has it (class attribute NoneType) but RECORDED does not"
    ]


def test_guard_fails_when_aiosmtpd_drops_a_session_attribute(monkeypatch):
    monkeypatch.setitem(RECORDED_STATE["Session"], "host_name", "property")
    assert state_problems() == ["Session.host_name: was property, now instance attribute"]


def test_guard_fails_when_aiosmtpd_stops_calling_an_override():
    source = AIOSMTPD_SOURCE.replace("self._getaddr(", "self._parse_address(")
    assert call_problems(source) == ["_getaddr: ofmipd overrides it, but aiosmtpd never calls it"]
    source = AIOSMTPD_SOURCE.replace("self._smtp_methods.get(", "self._commands.get(")
    assert call_problems(source)[0].startswith("_handle_client no longer dispatches")


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        (
            "_call_handler_hook('MAIL', address, mail_options)",
            "_call_handler_hook('MAIL', address)",
            "handle_MAIL takes 2 arguments, aiosmtpd passes {1}",
        ),
        (
            "hook(self, self.session, self.envelope, *args)",
            "hook(self.session, self.envelope, *args)",
            "_call_handler_hook calls the hook as ['hook(self.session, self.envelope, *args)']",
        ),
        (
            "_call_handler_hook('RCPT', address, rcpt_options)",
            "_call_handler_hook('RECIPIENT', address, rcpt_options)",
            "handle_RCPT takes 2 arguments, aiosmtpd passes None",
        ),
    ],
)
def test_guard_fails_when_aiosmtpd_changes_how_it_calls_a_hook(old, new, problem):
    assert old in AIOSMTPD_SOURCE
    assert hook_problems(AIOSMTPD_SOURCE.replace(old, new)) == [problem]
