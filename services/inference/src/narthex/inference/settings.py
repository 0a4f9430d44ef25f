"""Settings of the inference service (environment prefix NARTHEX_INFERENCE_)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from narthex.common.settings import AuthClientSettings


class InferenceSettings(AuthClientSettings):
    model_config = SettingsConfigDict(env_prefix="NARTHEX_INFERENCE_")

    service_name: ClassVar[str] = "inference"

    port: int = Field(8003, ge=1, le=65535, description="TCP port to bind")
