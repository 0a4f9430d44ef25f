"""The roles and scopes narthex tokens carry: one vocabulary for the issuer and the checkers."""

from __future__ import annotations

ADMIN = "admin"  # role: operators; may act on any tenant
TENANT = "tenant"  # role: an app team's own tenant

INFERENCE = "inference"  # predictions, embeddings, the Open Inference Protocol
EVENTS = "events"  # event ingestion
USAGE = "usage"  # reading the tenant's own usage and quota
KEYS = "keys"  # managing the tenant's own API keys
ADMIN_SCOPE = "admin"  # the admin API

TENANT_SCOPES = frozenset({INFERENCE, EVENTS, USAGE, KEYS})


def scopes_for(roles: frozenset[str] | set[str] | list[str]) -> frozenset[str]:
    """Every scope a holder of `roles` may be granted."""
    return TENANT_SCOPES | {ADMIN_SCOPE} if ADMIN in roles else TENANT_SCOPES
