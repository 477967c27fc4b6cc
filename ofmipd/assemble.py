"""Configuration to live objects: the only construction path.

The daemon, one-session mode, --check-config and ofmipd-authtest all call
build_app(), so what the admin tests is what the server runs.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING, Any

import auth_backends
from ofmipd.app import App
from ofmipd.auth import Chain
from ofmipd.config import BackendSpec, Config
from ofmipd.delivery import Delivery, MaildirTarget, SendmailTarget, Target
from ofmipd.errors import ConfigError

if TYPE_CHECKING:
    from ofmipd.policy_client import PolicyClients
    from ofmipd.quota import Quotas
    from ofmipd.ratelimit import LoginLimiter
    from ofmipd.rules import Rules
    from ofmipd.store import Store


def default_hostname() -> str:
    # Worked out once at start-up; never a DNS lookup per connection.
    name = socket.gethostname()
    if "." not in name:
        try:
            fqdn = socket.getfqdn(name)
        except OSError:
            fqdn = name
        if "." in fqdn and not fqdn.startswith("localhost"):
            name = fqdn
    return name


log = logging.getLogger("ofmipd")


def build_chain(config: Config) -> Chain:
    backends = [auth_backends.create(spec) for spec in config.auth]
    for spec in config.auth:
        _warn_if_cut_short(spec, config.auth_timeout)
    return Chain(backends, timeout=config.auth_timeout)


def _warn_if_cut_short(spec: BackendSpec, auth_timeout: float) -> None:
    """A backend's own timeout at or above the chain's means the chain gives up first, with
    a vaguer reason (and, for a remote store, before Dovecot's penalty is over)."""
    declared = auth_backends.declared(spec.kind)
    if not any(option.name == "timeout" for option in declared.options):
        return
    settings = declared.settings(spec)
    if float(settings["timeout"]) >= auth_timeout:
        log.warning(
            "%s: timeout %gs is not shorter than --auth-timeout %gs: the chain gives up first",
            settings.where, float(settings["timeout"]), auth_timeout,
        )  # fmt: skip


def build_delivery(config: Config, hostname: str) -> Delivery:
    target: Target
    if config.injector_exits and (config.maildir or config.relay):
        # a Maildir or a relay has no exit status: the setting would do nothing
        other = "--maildir" if config.maildir else "--relay"
        raise ConfigError(f"--injector-exits applies to --sendmail, not to {other}")
    if config.relay:
        from ofmipd.relay import Relay, parse_url, read_login

        target = Relay(
            parse_url(config.relay),
            tls=config.relay_tls,
            size=config.relay_connections,
            identity=config.relay_identity,
            hostname=hostname,
            login=read_login(config.relay_auth) if config.relay_auth else None,
        )
    elif config.maildir:
        owner = None
        if config.username and os.geteuid() == 0:
            from ofmipd.privileges import lookup

            user = lookup(config.username)  # the Maildir is theirs: they deliver into it
            owner = (user.uid, user.gid)
        try:
            target = MaildirTarget(config.maildir, owner)
        except OSError as error:
            named = error.filename not in (None, os.path.abspath(config.maildir))
            where = f"{error.filename}: " if named else ""
            raise ConfigError(f"--maildir {config.maildir}: {where}{error.strerror}") from None
    else:
        program = config.sendmail_program
        exits = config.injector_exits or "sysexits"
        target = SendmailTarget(program, config.delivery_timeout, exits)
        executable = target.argv[0] if target.argv else ""
        if not (os.path.isfile(executable) and os.access(executable, os.X_OK)):
            raise ConfigError(f"sendmail program {executable!r} is not an executable file")
    if config.throttle_script and not os.access(config.throttle_script, os.X_OK):
        raise ConfigError(f"--throttle-script {config.throttle_script}: not executable")
    return Delivery(target, config.throttle_script, config.delivery_timeout)


def build_rules(config: Config) -> Rules | None:
    if not config.rules and not config.rule_tables:
        return None
    from ofmipd.rules import Rules

    if config.rules:
        return Rules.from_file(config.rules)
    return Rules.from_config(list(config.rule_tables), config.source)


def build_limiter(config: Config) -> LoginLimiter | None:
    """Guessing limits, on unless --ratelimit off (the SQLite store by default)."""
    if config.ratelimit is not None and config.ratelimit.strip().lower() in ("off", "none"):
        return None
    from ofmipd.ratelimit import parse_ratelimit

    options = {"fail_open": config.ratelimit_fail_open, **dict(config.ratelimit_options)}
    # A reservation must outlive the slowest chain, or more guesses would run at once.
    hold = config.auth_timeout * max(1, len(config.auth)) + 10
    return parse_ratelimit(
        config.ratelimit,
        options,
        state_dir=config.state_dir,
        username=config.username,
        hold=hold,
    )


def build_quotas(
    config: Config, limiter: LoginLimiter | None, reuse: Store | None = None
) -> Quotas | None:
    """--quota: counted in the guessing limits' store (the same one when they are on;
    else `reuse`, the running App's, or the one --ratelimit names)."""
    if not config.quota:
        return None
    from ofmipd.quota import Quotas
    from ofmipd.ratelimit import open_store

    options = dict(config.ratelimit_options)
    store: Store
    if limiter is not None:
        store = limiter.store
    elif reuse is not None:
        store = reuse
    else:
        store = open_store(
            config.ratelimit or "", options, state_dir=config.state_dir, username=config.username
        )
    # A hold outlives the longest transaction that keeps to the timeouts; one left by a
    # process killed mid-transaction frees its budget by itself after that.
    hold = config.idle_timeout * 2 + config.data_timeout + config.delivery_timeout
    return Quotas(
        config.quota,
        store,
        permanent=config.quota_reply == "permanent",
        fail_open=bool(options.get("fail_open", config.ratelimit_fail_open)),
        hold=hold,
    )


def share_store(chain: Chain, store: Store | None) -> None:
    """The passwd-file records its app passwords' last use in the embedded store; SCRAM's
    salts come from a pepper kept there (ofmipd.scram_salts)."""
    chain.store = store
    for backend in chain.backends:
        if backend.name == "passwd-file":
            backend.store = store  # type: ignore[attr-defined]


def build_app(config: Config, previous: App | None = None) -> App:
    """`previous` is the running App on a reload: its rate-limit state and metrics
    endpoint carry over, so a SIGHUP neither forgets failures nor rebinds a port."""
    chain = build_chain(config)
    mechanisms = ("PLAIN", "LOGIN") + (("CRAM-MD5",) if chain.supports_cram_md5 else ())
    if chain.supports_scram:  # -PLUS only on sessions with our own TLS: see smtp.py
        mechanisms += ("SCRAM-SHA-1", "SCRAM-SHA-256", "SCRAM-SHA-256-PLUS")
    hostname = config.hostname or default_hostname()
    app = App(
        config=config,
        hostname=hostname,
        chain=chain,
        delivery=build_delivery(config, hostname),
        mechanisms=mechanisms,
    )
    if config.relay:
        from ofmipd.relay import Relay

        assert isinstance(app.delivery.target, Relay)
        app.relay = app.delivery.target
    if config.ssl or config.tls:
        from ofmipd.tls import server_context

        context = server_context(config.ssl_cert, config.ssl_key, config.ciphers)
        if config.ssl:
            app.implicit_tls_context = context
        else:
            app.starttls_context = context
    app.rules = build_rules(config)
    if config.reverse_dns:
        from ofmipd.rdns import ReverseNames

        app.reverse_names = (previous and previous.reverse_names) or ReverseNames()

    def limits(c: Config) -> tuple[Any, ...]:
        return (c.ratelimit, c.ratelimit_options, c.ratelimit_fail_open, c.state_dir)

    same_limits = previous is not None and limits(previous.config) == limits(config)
    if previous is not None and same_limits:
        app.limiter = previous.limiter
    else:
        app.limiter = build_limiter(config)
    reuse = previous.quotas.store if previous and previous.quotas and same_limits else None
    app.quotas = build_quotas(config, app.limiter, reuse)
    share_store(
        chain, app.limiter.store if app.limiter else app.quotas.store if app.quotas else None
    )
    if previous is not None:
        app.metrics = previous.metrics
    if config.sender_map:
        from ofmipd.senders import SenderMap

        app.senders = SenderMap.from_file(config.sender_map)
    if config.proxy_protocol:
        from ofmipd.proxy import TrustedProxies

        app.proxy_trust = TrustedProxies.parse(",".join(config.proxy_protocol))
    if config.tls_in_front:
        from ofmipd.identity import Networks

        app.tls_terminators = Networks.parse(config.tls_in_front, option="--tls-in-front")
    if config.policy:
        app.policy_clients = build_policy_clients(config)
        if previous is not None and previous.policy_clients is not None:
            # A reload keeps the kept connections when nothing about the services changed.
            if policy_settings(previous.config) == policy_settings(config):
                app.policy_clients = previous.policy_clients
            else:
                previous.policy_clients.close()
    return app


def policy_settings(config: Config) -> tuple[Any, ...]:
    return (config.policy, config.policy_timeout, config.policy_default_action)


def build_policy_clients(config: Config) -> PolicyClients:
    from ofmipd import policy_client

    defaults = {
        "timeout": config.policy_timeout,
        "default_action": config.policy_default_action,
    }
    return policy_client.build(config.policy, defaults)
