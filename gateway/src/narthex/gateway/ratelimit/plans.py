"""What each tenant may do: its plan's limits, read from the auth service and cached briefly."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import structlog

from narthex.common.errors import NotFound, ServiceUnavailable
from narthex.common.http import ServiceClient
from narthex.common.plans import TenantLimits
from narthex.common.tokens import Principal
from narthex.gateway.singleflight import SingleFlight

log = structlog.get_logger("narthex.gateway.ratelimit.plans")


class Plans(Protocol):
    """Where the gateway reads plans: a PlanBook, or a test's fixed plan."""

    async def plan_of(self, principal: Principal) -> TenantLimits:
        """The caller's own tenant's plan as it is now."""
        ...

    async def plan_for(self, tenant_id: str, admin: Principal) -> TenantLimits:
        """Another tenant's plan, read with an admin's token."""
        ...


@dataclass(frozen=True, slots=True)
class _Entry:
    plan: TenantLimits
    fresh_until: float  # monotonic


class PlanBook:
    """Tenant -> current plan, refreshed at most every `ttl` seconds per tenant.

    The token's `plan` claim is what the tenant had when the token was issued (up to 15
    minutes ago); enforcement uses the plan as it is now, so a plan change takes effect
    within `ttl`. When the auth service cannot answer, the last known plan is kept.
    """

    def __init__(self, auth: ServiceClient, *, ttl: float = 30.0) -> None:
        self.auth = auth
        self.ttl = ttl
        self._entries: dict[str, _Entry] = {}
        self._pending: SingleFlight[TenantLimits] = SingleFlight()
        self.fetches = 0

    async def plan_of(self, principal: Principal) -> TenantLimits:
        entry = self._entries.get(principal.tenant)
        if entry is not None and entry.fresh_until > time.monotonic():
            return entry.plan
        return await self._pending.run(principal.tenant, lambda: self._fetch(principal, entry))

    async def plan_for(self, tenant_id: str, admin: Principal) -> TenantLimits:
        """Another tenant's plan, read with an admin's token (for the admin quota view)."""
        if tenant_id == admin.tenant:
            return await self.plan_of(admin)
        auth = {"authorization": f"Bearer {admin.token}"}
        tenant = await self.auth.get(f"/v1/admin/tenants/{tenant_id}", headers=auth, deadline=2.0)
        if tenant.status_code == 404:
            raise NotFound("no such tenant")
        plans = await self.auth.get("/v1/admin/plans", headers=auth, deadline=2.0)
        if tenant.status_code != 200 or plans.status_code != 200:
            raise ServiceUnavailable("tenant limits are unavailable", headers={"Retry-After": "1"})
        name = tenant.json()["plan"]
        body = next(p for p in plans.json() if p["name"] == name)
        return TenantLimits.model_validate({**body, "tenant": tenant_id, "plan": name})

    async def _fetch(self, principal: Principal, stale: _Entry | None) -> TenantLimits:
        self.fetches += 1
        try:
            response = await self.auth.get(
                "/v1/auth/limits",
                headers={"authorization": f"Bearer {principal.token}"},
                deadline=2.0,
            )
            response.raise_for_status()
            body = response.json()
            plan = TenantLimits.model_validate(body)
        except Exception as exc:  # unreachable, failing or malformed: all the same here
            if stale is not None:
                log.warning("plan refresh failed; using the last known plan", error=repr(exc))
                self._entries[principal.tenant] = _Entry(stale.plan, time.monotonic() + 5.0)
                return stale.plan
            raise ServiceUnavailable(
                "tenant limits are unavailable", headers={"Retry-After": "1"}
            ) from exc
        self._entries[principal.tenant] = _Entry(plan, time.monotonic() + self.ttl)
        return plan
