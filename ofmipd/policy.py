"""What a client may do, decided once per connection from its identity, the host
rules and the TLS mode (the "realm" beside the authenticator chain's "checker")."""

from __future__ import annotations

from typing import Any, NamedTuple

from ofmipd.identity import ClientIdentity


class ClientPolicy(NamedTuple):
    deny: bool = False
    deny_message: str = "554 5.7.1 Access denied"
    relay: bool = False  # may send without AUTH
    tls_required: bool = False  # AUTH and MAIL only once the channel is encrypted
    rule: str = "default"  # which rule decided, for logs and ofmipd-authtest


def decide(client: ClientIdentity, tls_mode: str | None, rules: Any | None) -> ClientPolicy:
    tls_required = tls_mode == "on" or (tls_mode == "localoptional" and not client.is_loopback)
    relay = client.relay_client
    rule_text = "RELAYCLIENT in environment" if relay else "default"
    if rules is not None:
        rule = rules.match(client.ip)
        if rule is not None:
            rule_text = rule.describe()
            action = rule.action
            if action == "deny":
                message = getattr(rule, "message", None) or "Access denied"
                return ClientPolicy(deny=True, deny_message=f"554 5.7.1 {message}", rule=rule_text)
            relay = relay or action == "relay"
            tls_required = tls_required or action == "require-tls"
    return ClientPolicy(relay=relay, tls_required=tls_required, rule=rule_text)
