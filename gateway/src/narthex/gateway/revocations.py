"""Revoked keys and disabled tenants: polled from the auth service, checked on every request."""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from narthex.common.http import ServiceClient
from narthex.common.readiness import CheckResult
from narthex.common.tokens import Principal

log = structlog.get_logger("narthex.gateway.revocations")

REVOCATIONS_PATH = "/internal/v1/revocations"


class Revocations:
    """What the gateway must refuse although a token's signature checks.

    A token lives up to 15 minutes and the gateway verifies it without asking anyone,
    so revoking a key (or disabling a tenant) would leave the tokens already minted
    working until they expire. The auth service lists the keys revoked within a token's
    lifetime and the tenants disabled now; one background call every few seconds
    (`poll`, not a call per request) brings the list here, and `refuses` is two set
    lookups on the request path. Tokens name their key in `client_id`; tokens that
    name none (minted before keys were named) are still refused with their tenant.

    When auth cannot be reached the last list stays in force: an auth outage must not
    become an outage of every tenant, nor un-revoke anything.
    """

    def __init__(self, auth: ServiceClient, *, clock: Callable[[], float] = time.monotonic):
        self.auth = auth
        self._clock = clock
        self.keys: frozenset[str] = frozenset()
        self.tenants: frozenset[str] = frozenset()
        self.polls = 0  # successful polls, for readiness and tests
        self.updated_at: float | None = None

    def refuses(self, principal: Principal) -> bool:
        if principal.tenant in self.tenants:
            return True
        return principal.key_id is not None and principal.key_id in self.keys

    async def poll(self) -> None:
        response = await self.auth.get(REVOCATIONS_PATH, deadline=5.0)
        if response.status_code != 200:
            raise RuntimeError(f"revocation list answered {response.status_code}")
        body = response.json()
        keys, tenants = body.get("keys"), body.get("tenants")
        if not _strings(keys) or not _strings(tenants):
            raise RuntimeError("revocation list is malformed")
        self.keys, self.tenants = frozenset(keys), frozenset(tenants)
        self.polls += 1
        self.updated_at = self._clock()

    async def check(self) -> CheckResult:
        """For /readyz (not required: a stale list is reported, not an outage)."""
        detail: dict[str, object] = {
            "polls": self.polls,
            "keys": len(self.keys),
            "tenants": len(self.tenants),
        }
        if self.updated_at is None:
            return CheckResult(False, detail)
        detail["updated_seconds_ago"] = round(self._clock() - self.updated_at, 3)
        return CheckResult(True, detail)


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)
