"""Settings of the features service (environment prefix NARTHEX_FEATURES_)."""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict
from redis.connection import parse_url

from narthex.common.settings import AuthClientSettings
from narthex.transactions import RETENTION_SECONDS


class FeaturesSettings(AuthClientSettings):
    model_config = SettingsConfigDict(env_prefix="NARTHEX_FEATURES_")

    service_name: ClassVar[str] = "features"

    port: int = Field(8002, ge=1, le=65535, description="TCP port to bind")
    redis_url: str | None = Field(
        None,
        description="online store shared by every replica (unset: in-process store, one replica)",
    )
    redis_cluster: bool = Field(
        False,
        description="redis_url names a node of a Redis Cluster (the client follows the"
        " cluster's slots; every key set one call touches shares a hash tag)",
    )
    redis_prefix: str = Field(
        "narthex:features",
        min_length=1,
        pattern=r"^[^{}]+$",
        description="Redis key prefix of the online store (no braces: they would make a hash tag)",
    )
    redis_max_connections: int = Field(
        32,
        ge=1,
        description="Redis connections per replica, per node of a cluster (calls wait for a"
        " free one)",
    )
    redis_timeout: float = Field(
        1.0, gt=0, description="seconds to connect to Redis, or to wait for one of its answers"
    )
    max_batch_events: int = Field(1000, ge=1, description="transaction events per ingest request")
    max_future_seconds: float = Field(
        300.0, ge=0, description="events timestamped further ahead of server time are refused"
    )
    max_entities: int = Field(
        1000, ge=1, description="entities ((tenant, account) pairs) per batchGet request"
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="request bodies above this get 413")
    retention_margin_seconds: float = Field(
        86_400.0,
        ge=0,
        description="an account's state expires this long after it would read as the defaults",
    )

    @field_validator("redis_url")
    @classmethod
    def _parse_redis_url(cls, value: str | None) -> str | None:
        if value is not None:
            # redis-py's own parser: a bad scheme or port stops start-up, naming the setting.
            parse_url(value)  # type: ignore[no-untyped-call]
        return value

    @model_validator(mode="after")
    def _margin_covers_future_events(self) -> FeaturesSettings:
        # A state's newest event may be up to max_future_seconds ahead of the write that
        # stored it; the expiry must still leave it RETENTION_SECONDS after that event.
        if self.retention_margin_seconds < self.max_future_seconds:
            prefix = str(self.model_config.get("env_prefix", "")).upper()
            raise ValueError(
                f"{prefix}RETENTION_MARGIN_SECONDS must be at least"
                f" {prefix}MAX_FUTURE_SECONDS ({self.retention_margin_seconds:g} <"
                f" {self.max_future_seconds:g})"
            )
        return self

    @property
    def state_ttl_seconds(self) -> int:
        """How long an account's state outlives its last write (Redis EX, whole seconds)."""
        return math.ceil(RETENTION_SECONDS + self.retention_margin_seconds)
