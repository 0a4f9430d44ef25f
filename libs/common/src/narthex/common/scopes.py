"""The roles and scopes narthex tokens carry: one vocabulary for the issuer and the checkers."""

from __future__ import annotations

ADMIN = "admin"  # role: operators; may act on any tenant
TENANT = "tenant"  # role: an app team's own tenant
# Role: a platform service calling another on its own behalf (inference reading features).
# Only provisioned by the operator's tooling (`narthex up`, the CLI): the admin API cannot
# grant it, and its holder acts for no tenant.
SERVICE = "service"

INFERENCE = "inference"  # predictions, embeddings, the Open Inference Protocol
EVENTS = "events"  # event ingestion
USAGE = "usage"  # reading the tenant's own usage and quota
KEYS = "keys"  # managing the tenant's own API keys
ADMIN_SCOPE = "admin"  # the admin API
FEATURES_LOOKUP = "features:lookup"  # any tenant's account aggregates (batchGet)

TENANT_SCOPES = frozenset({INFERENCE, EVENTS, USAGE, KEYS})
SERVICE_SCOPES = frozenset({FEATURES_LOOKUP})


def scopes_for(roles: frozenset[str] | set[str] | list[str]) -> frozenset[str]:
    """Every scope a holder of `roles` may be granted.

    A service identity gets the service scopes only; no tenant, admins included, can ever
    be granted one of them (they read every tenant's data).
    """
    if SERVICE in roles:
        return SERVICE_SCOPES
    return TENANT_SCOPES | {ADMIN_SCOPE} if ADMIN in roles else TENANT_SCOPES
