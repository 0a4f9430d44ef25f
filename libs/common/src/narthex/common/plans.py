"""A tenant's plan limits as auth answers them (`GET /v1/auth/limits`) and the gateway
enforces them: the contract between the two, written once."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["TenantLimits"]


class TenantLimits(BaseModel):
    """What the gateway enforces for a tenant: its current plan's numbers."""

    model_config = ConfigDict(frozen=True)

    tenant: str
    plan: str
    rate_per_second: float
    burst: int
    daily_quota: int
    max_items_per_request: int
    # Model names (every version of each); empty means every model.
    allowed_models: tuple[str, ...]

    def allows_model(self, name: str) -> bool:
        return not self.allowed_models or name in self.allowed_models
