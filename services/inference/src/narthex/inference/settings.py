"""Settings of the inference service (environment prefix NARTHEX_INFERENCE_)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AnyHttpUrl, Field, SecretStr, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from narthex.common.http import ClientPolicy
from narthex.common.settings import AuthClientSettings

Provider = Literal["auto", "tensorrt", "cuda", "cpu"]


class InferenceSettings(AuthClientSettings):
    model_config = SettingsConfigDict(env_prefix="NARTHEX_INFERENCE_")

    service_name: ClassVar[str] = "inference"

    port: int = Field(8003, ge=1, le=65535, description="TCP port to bind")
    model_repository: Path = Field(
        Path(".state/models"), description="model repository: <name>/config.yaml, <name>/<v>/"
    )
    models: Annotated[list[str], NoDecode] = Field(
        [], description="models loaded at start (comma-separated; empty: every model found)"
    )
    provider: Provider = Field(
        "auto", description="execution provider: auto = TensorRT, then CUDA, then CPU"
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime threads of one session run (0: one per core, split"
        " between the instances of a version that has several)",
    )
    max_body_bytes: int = Field(
        16 << 20, ge=1024, description="request bodies above this get 413 (binary tensors)"
    )
    max_text_bytes: int = Field(
        16384, ge=16, description="longest text accepted (UTF-8 bytes), before tokenizing"
    )
    embeddings_fast_path: bool = Field(
        True,
        description="answer POST /v1/embeddings ahead of FastAPI's router (false: the declared"
        " route answers it, alike, for more CPU per request)",
    )
    request_timeout: float = Field(
        30.0, gt=0, description="a request without a deadline header waits at most this long"
    )
    refusal_hold: float = Field(
        0.5,
        ge=0,
        description="a request refused because its tenant holds its share of a full queue"
        " gets its 503 after about this many seconds (+-50%, at most its deadline): clients"
        " that ignore Retry-After cannot make refusals a CPU storm",
    )
    features_url: AnyHttpUrl = Field(
        AnyHttpUrl("http://127.0.0.1:8002"),
        description="features service (account aggregates for transaction models)",
    )
    service_key: SecretStr | None = Field(
        None,
        description="inference's own API key (a service identity, e.g. made by `narthex up`):"
        " exchanged at auth for the token it reads features with (unset: transaction models"
        " score on the default features)",
    )
    features_timeout: float = Field(
        0.05, gt=0, description="budget of one batch's feature lookup, seconds (then defaults)"
    )
    features_breaker_fail_max: int = Field(
        5, ge=1, description="consecutive failed lookups that open the breaker to features"
    )
    features_breaker_reset_timeout: float = Field(
        10.0, gt=0, description="seconds the breaker to features stays open before a trial"
    )
    redis_url: str | None = Field(
        None, description="Redis of the event streams: prediction events for drift (unset: off)"
    )
    events_prefix: str = Field(
        "narthex:events", min_length=1, description="key prefix of the event streams"
    )
    events_buffer: int = Field(
        100_000, ge=1, description="events held in memory while Redis is away, at most"
    )
    drain_timeout: float = Field(
        30.0, gt=0, description="an unloaded version finishes its requests within this time"
    )

    def features_policy(self) -> ClientPolicy:
        # The whole lookup lives within the budget: one quick retry at most, and a breaker
        # so that a dead features service costs nothing but the defaults.
        return ClientPolicy(
            connect_timeout=self.features_timeout,
            try_timeout=self.features_timeout,
            deadline=self.features_timeout,
            max_attempts=2,
            backoff_base=0.005,
            breaker_fail_max=self.features_breaker_fail_max,
            breaker_reset_timeout=self.features_breaker_reset_timeout,
        )

    @field_validator("models", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        # An environment variable is "fraud,minilm".
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
