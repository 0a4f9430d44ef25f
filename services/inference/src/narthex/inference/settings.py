"""Settings of the inference service (environment prefix NARTHEX_INFERENCE_)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

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
        0, ge=0, description="ONNX Runtime threads per session (0: one per core)"
    )
    max_body_bytes: int = Field(
        16 << 20, ge=1024, description="request bodies above this get 413 (binary tensors)"
    )
    max_text_bytes: int = Field(
        16384, ge=16, description="longest text accepted (UTF-8 bytes), before tokenizing"
    )
    request_timeout: float = Field(
        30.0, gt=0, description="a request without a deadline header waits at most this long"
    )
    drain_timeout: float = Field(
        30.0, gt=0, description="an unloaded version finishes its requests within this time"
    )

    @field_validator("models", mode="before")
    @classmethod
    def _split_names(cls, value: Any) -> Any:
        # An environment variable is "fraud,minilm".
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
