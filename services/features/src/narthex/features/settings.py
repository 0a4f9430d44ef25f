"""Settings of the features service (environment prefix NARTHEX_FEATURES_)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from narthex.common.settings import AuthClientSettings


class FeaturesSettings(AuthClientSettings):
    model_config = SettingsConfigDict(env_prefix="NARTHEX_FEATURES_")

    service_name: ClassVar[str] = "features"

    port: int = Field(8002, ge=1, le=65535, description="TCP port to bind")
