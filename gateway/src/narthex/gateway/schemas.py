"""Bodies of the gateway's own API (the proxied APIs are described by their services)."""

from __future__ import annotations

from pydantic import BaseModel


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
