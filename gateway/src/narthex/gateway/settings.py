"""Settings of the gateway (environment prefix NARTHEX_GATEWAY_)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import orjson
from limits import parse_many
from pydantic import AnyHttpUrl, Field, IPvAnyNetwork, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from narthex.common.http import ClientPolicy
from narthex.common.settings import AuthClientSettings
from narthex.gateway.resp import Endpoint


class GatewaySettings(AuthClientSettings):
    model_config = SettingsConfigDict(env_prefix="NARTHEX_GATEWAY_")

    service_name: ClassVar[str] = "gateway"

    port: int = Field(8000, ge=1, le=65535, description="TCP port to bind")
    features_url: AnyHttpUrl = Field(
        AnyHttpUrl("http://127.0.0.1:8002"), description="features service"
    )
    inference_url: AnyHttpUrl = Field(
        AnyHttpUrl("http://127.0.0.1:8003"), description="inference service"
    )
    analytics_url: AnyHttpUrl = Field(
        AnyHttpUrl("http://127.0.0.1:8004"), description="analytics service"
    )
    max_decoded_body_bytes: int = Field(
        1 << 20,
        ge=1,
        description="a limited request's body, decompressed, above this gets 413 (compression"
        " saves a client bandwidth, never buys it a bigger request)",
    )
    upstream_connect_timeout: float = Field(1.0, gt=0, description="per try, seconds")
    upstream_try_timeout: float = Field(30.0, gt=0, description="per try, seconds")
    upstream_deadline: float = Field(30.0, gt=0, description="all tries together, seconds")
    upstream_retries: bool = Field(True, description="retry safe requests (off under Istio)")
    upstream_max_attempts: int = Field(3, ge=1, le=10, description="tries per request")
    breaker_fail_max: int = Field(5, ge=1, description="consecutive failures that open")
    api_key_revalidate_seconds: float = Field(
        30.0, gt=0, description="an API key's exchange is redone this often (revocation delay)"
    )
    redis_url: str | None = Field(
        None, description="shared rate limits across replicas (unset: in-process limits)"
    )
    ratelimit_prefix: str = Field("narthex:gw:rl", description="Redis key prefix of the limits")
    ratelimit_failure_mode: Literal["open", "closed"] = Field(
        "open", description="Redis down: open = per-replica limits, closed = 503"
    )
    replicas: int = Field(1, ge=1, description="gateway replicas (divides the fallback limits)")
    plan_cache_seconds: float = Field(
        30.0, gt=0, description="a plan change reaches the limiter within this time"
    )
    breaker_reset_timeout: float = Field(10.0, gt=0, description="seconds open before a trial")
    trusted_proxies: Annotated[list[IPvAnyNetwork], NoDecode] = Field(
        [], description="CIDRs (comma-separated) whose X-Forwarded-For is believed"
    )
    token_exchange_limit: str = Field(
        "30/minute",
        description="token exchanges per client IP (slowapi notation); API keys new to the"
        " gateway, presented on any route, count against it too",
    )
    status_poll_seconds: float = Field(
        5.0, gt=0, description="how often each upstream's /readyz is probed (status, /readyz)"
    )
    status_probe_timeout: float = Field(1.0, gt=0, description="one probe, seconds")
    revocation_poll_seconds: float = Field(
        10.0,
        gt=0,
        le=20.0,
        description="how often revoked keys and disabled tenants are fetched from auth"
        " (a revocation takes effect within this plus one fetch: under 30 s)",
    )
    public_cache_seconds: float = Field(
        5.0, gt=0, description="public answers the same for everyone (JWKS) are kept this long"
    )
    tenant_max_in_flight: int = Field(
        64,
        ge=1,
        description="requests one tenant may have in flight through this replica (no tenant"
        " can hold every pooled upstream connection)",
    )
    events: bool = Field(
        True,
        description="emit one usage event per authenticated request to Redis Streams"
        " (needs events_redis_url or redis_url)",
    )
    events_redis_url: str | None = Field(
        None, description="Redis of the event streams (unset: redis_url)"
    )
    events_prefix: str = Field(
        "narthex:events", min_length=1, description="key prefix of the event streams"
    )
    events_buffer: int = Field(
        100_000,
        ge=1,
        description="events held in memory while Redis is away; beyond it they are dropped"
        " (and counted)",
    )
    upstream_max_response_bytes: int = Field(
        16 << 20, ge=1024, description="a larger upstream answer is a 502, never buffered whole"
    )

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_networks(cls, value: Any) -> Any:
        # An environment variable is "10.0.0.0/8, 192.168.0.0/16" (or a JSON list).
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return orjson.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("redis_url", "events_redis_url")
    @classmethod
    def _parse_redis_url(cls, value: str | None) -> str | None:
        if value is not None:
            Endpoint.from_url(value)  # refused at startup, naming what is wrong
        return value

    @field_validator("token_exchange_limit")
    @classmethod
    def _parse_limit(cls, value: str) -> str:
        # Refused at startup rather than on the first token exchange.
        if len(parse_many(value)) != 1:
            raise ValueError("expected exactly one limit, such as 30/minute")
        return value

    def events_url(self) -> str | None:
        """Where usage events go, or None when they are off."""
        return (self.events_redis_url or self.redis_url) if self.events else None

    def upstream_urls(self) -> dict[str, str]:
        return {
            "auth": str(self.auth_url).rstrip("/"),
            "features": str(self.features_url).rstrip("/"),
            "inference": str(self.inference_url).rstrip("/"),
            "analytics": str(self.analytics_url).rstrip("/"),
        }

    def client_policy(self) -> ClientPolicy:
        return ClientPolicy(
            connect_timeout=self.upstream_connect_timeout,
            try_timeout=self.upstream_try_timeout,
            deadline=self.upstream_deadline,
            retries=self.upstream_retries,
            max_attempts=self.upstream_max_attempts,
            breaker_fail_max=self.breaker_fail_max,
            breaker_reset_timeout=self.breaker_reset_timeout,
            max_response_bytes=self.upstream_max_response_bytes,
        )
