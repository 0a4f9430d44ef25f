"""Settings of the auth service (environment prefix NARTHEX_AUTH_)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from narthex.common.settings import ServiceSettings


class AuthSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="NARTHEX_AUTH_")

    service_name: ClassVar[str] = "auth"

    port: int = Field(8001, ge=1, le=65535, description="TCP port to bind")
    key_pepper: SecretStr = Field(
        SecretStr("dev-pepper-change-me"),
        description="secret mixed into every stored API-key hash (required outside dev)",
    )
