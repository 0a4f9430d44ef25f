"""Settings of the auth service (environment prefix NARTHEX_AUTH_)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from narthex.common.settings import JwtSettings


class AuthSettings(JwtSettings):
    model_config = SettingsConfigDict(env_prefix="NARTHEX_AUTH_")

    service_name: ClassVar[str] = "auth"

    port: int = Field(8001, ge=1, le=65535, description="TCP port to bind")
    key_pepper: SecretStr = Field(
        SecretStr("dev-pepper-change-me"),
        description="secret mixed into every stored API-key hash (required outside dev)",
    )
    database_url: str = Field(
        "sqlite+aiosqlite:///.state/auth.db",
        description="SQLAlchemy async URL: sqlite+aiosqlite:///... or postgresql+asyncpg://...",
    )
    signing_keys_dir: Path = Field(
        Path(".state/keys"),
        description="RSA signing keys (current.pem, previous.pem, next.pem); generated in dev",
    )
    token_ttl_seconds: int = Field(900, ge=60, le=86400, description="lifetime of issued JWTs")
    key_rotation_grace_seconds: int = Field(
        86400, ge=0, description="how long a rotated API key keeps working"
    )
    signing_key_publish_seconds: float = Field(
        300.0, ge=0, description="a new signing key is published this long before it signs"
    )
    last_used_flush_seconds: float = Field(
        10.0, gt=0, description="how often key last-used times are written (batched)"
    )

    def key_env(self) -> str:
        """The `<env>` part of the API keys this deployment issues."""
        return {"prod": "live"}.get(self.env, self.env)
