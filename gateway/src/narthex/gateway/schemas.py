"""Bodies of the gateway's own API (the proxied APIs are described by their services)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Bucket(BaseModel):
    capacity: int
    remaining: float
    refill_per_second: float
    seconds_until_full: float


class Daily(BaseModel):
    limit: int
    used: int
    remaining: int
    seconds_until_reset: float


class Quota(BaseModel):
    tenant: str
    plan: str
    max_items_per_request: int
    bucket: Bucket
    daily: Daily


class UpstreamStatus(BaseModel):
    """An upstream as the gateway's background probe last found it."""

    upstream: str
    status: Literal["up", "down", "unknown"]
    breaker: Literal["closed", "open", "half-open"] = Field(
        description="the gateway's circuit breaker to this upstream (it judges traffic)"
    )
    http_status: int | None = Field(None, description="what the upstream's /readyz answered")
    error: str | None = Field(None, description="why the probe got no answer")
    checked_seconds_ago: float | None = Field(None, description="age of the last probe")
