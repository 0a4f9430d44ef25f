"""Settings of the analytics service (environment prefix NARTHEX_ANALYTICS_)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from narthex.common.settings import AuthClientSettings


class AnalyticsSettings(AuthClientSettings):
    model_config = SettingsConfigDict(env_prefix="NARTHEX_ANALYTICS_")

    service_name: ClassVar[str] = "analytics"

    port: int = Field(8004, ge=1, le=65535, description="TCP port to bind")
