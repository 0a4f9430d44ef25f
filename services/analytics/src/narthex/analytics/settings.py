"""Settings of the analytics service (environment prefix NARTHEX_ANALYTICS_)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from narthex.common.settings import AuthClientSettings


class AnalyticsSettings(AuthClientSettings):
    model_config = SettingsConfigDict(env_prefix="NARTHEX_ANALYTICS_")

    service_name: ClassVar[str] = "analytics"

    port: int = Field(8004, ge=1, le=65535, description="TCP port to bind")
    database_url: str = Field(
        "sqlite+aiosqlite:///.state/analytics.db",
        description="aggregates (SQLite by default; postgresql+asyncpg://... for its own database)",
    )
    redis_url: str | None = Field(
        None, description="Redis holding the event streams (unset: no events are consumed)"
    )
    stream_prefix: str = Field(
        "narthex:events", min_length=1, description="key prefix of the event streams"
    )
    group: str = Field("analytics", min_length=1, description="the consumer group")
    consumer_batch: int = Field(
        50,
        ge=1,
        le=1000,
        description="stream entries read per round (each holds up to a producer's batch of"
        " events; they are applied in one transaction)",
    )
    block_ms: int = Field(1000, ge=1, description="how long one read waits for new events")
    min_round_seconds: float = Field(
        0.25,
        ge=0,
        le=5.0,
        description="a round that found less than a full batch waits this long from its"
        " start before the next (fewer, larger transactions; events counted that much later)",
    )
    claim_idle_seconds: float = Field(
        30.0,
        gt=0,
        description="a message pending this long with another consumer (a dead replica) is claimed",
    )
    claim_interval_seconds: float = Field(5.0, gt=0, description="how often to look for them")
    trim_interval_seconds: float = Field(
        10.0, gt=0, description="how often consumed entries are trimmed from the streams"
    )
    dedup_retention_days: float = Field(
        8.0, gt=0, description="event ids are remembered this long (duplicates older are rare)"
    )
    model_repository: Path = Field(
        Path(".state/models"), description="model repository: each version's score baseline"
    )
    drift_window_hours: int = Field(24, ge=1, le=24 * 90, description="scores compared, hours")
    drift_threshold: float = Field(0.2, gt=0, description="PSI above this is flagged")
    drift_interval_seconds: float = Field(30.0, gt=0, description="drift gauges refreshed")
    max_range_days: int = Field(400, ge=1, description="longest usage range one query may ask")
