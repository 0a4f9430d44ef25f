"""A plan book that answers one fixed plan: for gateway tests whose subject is not limits."""

from __future__ import annotations

from narthex.common.plans import TenantLimits
from narthex.common.tokens import Principal


class FixedPlans:
    def __init__(self, plan: TenantLimits) -> None:
        self.plan = plan
        self.lookups = 0

    async def plan_of(self, principal: Principal) -> TenantLimits:
        self.lookups += 1
        return self.plan.model_copy(update={"tenant": principal.tenant})

    async def plan_for(self, tenant_id: str, admin: Principal) -> TenantLimits:
        return self.plan.model_copy(update={"tenant": tenant_id})
