"""A plan book that answers one fixed plan: for gateway tests whose subject is not limits."""

from __future__ import annotations

import dataclasses

from narthex.common.tokens import Principal
from narthex.gateway.ratelimit.plans import TenantPlan


class FixedPlans:
    def __init__(self, plan: TenantPlan) -> None:
        self.plan = plan
        self.lookups = 0

    async def plan_of(self, principal: Principal) -> TenantPlan:
        self.lookups += 1
        return dataclasses.replace(self.plan, tenant=principal.tenant)

    async def plan_for(self, tenant_id: str, admin: Principal) -> TenantPlan:
        return dataclasses.replace(self.plan, tenant=tenant_id)
