"""Settings base: typed, env-driven, validated once at start-up."""

from __future__ import annotations

from typing import Any, ClassVar, Literal, TypeVar

from pydantic import AnyHttpUrl, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from narthex.common.deadline import DEFAULT_FLOOR_MS

Environment = Literal["dev", "test", "prod"]

# Secrets that ship as defaults so `make run` works out of the box. Anything that
# still looks like one of these is refused outside dev: a production deployment must
# say its secrets out loud.
PLACEHOLDER_PREFIXES = ("dev-", "change-me", "changeme", "placeholder", "insecure")


def is_placeholder(secret: SecretStr) -> bool:
    value = secret.get_secret_value().strip().lower()
    return not value or value.startswith(PLACEHOLDER_PREFIXES)


class ServiceSettings(BaseSettings):
    """What every service reads from its environment; subclasses set `env_prefix`."""

    model_config = SettingsConfigDict(
        env_prefix="NARTHEX_",
        extra="ignore",
        frozen=True,
        validate_default=True,
    )

    service_name: ClassVar[str] = "narthex"

    # Production unless told otherwise: a service started with nothing configured must not
    # serve its API docs or accept placeholder secrets. `narthex up` and the test launchers
    # say dev explicitly.
    env: Environment = Field(
        "prod",
        description="dev, test or prod; outside dev, placeholder secrets are refused and the"
        " API docs are not served",
    )
    host: str = Field("127.0.0.1", description="interface to bind")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to bind")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="minimum level written to the log"
    )
    log_json: bool = Field(True, description="JSON log lines (false: console)")
    access_log_sample_rate: float = Field(
        1.0, ge=0.0, le=1.0, description="share of successful requests logged"
    )
    tracing: bool = Field(True, description="OpenTelemetry spans (exported when OTLP is set)")
    # What a client may hold of a process (narthex.common.server, narthex.common.body).
    max_body_bytes: int = Field(1 << 20, ge=1, description="request bodies above this get 413")
    header_timeout: float = Field(
        10.0, gt=0, description="seconds to send a request's head (line and headers), or 408"
    )
    body_timeout: float = Field(30.0, gt=0, description="seconds to send a request's body, or 408")
    max_header_bytes: int = Field(
        64 << 10, ge=1024, description="a request's head above this many bytes gets 431"
    )
    max_connections: int = Field(
        2048, ge=1, description="open connections per process; past it a new one gets 503"
    )
    deadline_floor_ms: int = Field(
        DEFAULT_FLOOR_MS,
        ge=1,
        le=60_000,
        description="the least a caller's x-request-timeout-ms is taken to mean",
    )

    @model_validator(mode="after")
    def _refuse_placeholders(self) -> ServiceSettings:
        if self.env == "dev":
            return self
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            if isinstance(value, SecretStr) and is_placeholder(value):
                env_name = (self.model_config.get("env_prefix") or "") + name
                raise ValueError(
                    f"{env_name.upper()} must be set to a real secret when env={self.env}"
                    f" (field {field.alias or name})"
                )
        return self


S = TypeVar("S", bound=ServiceSettings)


class JwtSettings(ServiceSettings):
    """Settings of a service that issues or checks narthex tokens."""

    jwt_issuer: str = Field("narthex-auth", description="`iss` of every narthex token")
    jwt_audience: str = Field("narthex", description="`aud` of every narthex token")


class AuthClientSettings(JwtSettings):
    """Settings of a service that verifies callers' tokens against the auth service."""

    auth_url: AnyHttpUrl = Field(
        AnyHttpUrl("http://127.0.0.1:8001"), description="auth service (JWKS, token exchange)"
    )
    jwks_unknown_kid_cooldown: float = Field(
        30.0, gt=0, description="seconds between JWKS refreshes caused by unknown key ids"
    )


class SettingsError(SystemExit):
    """Start-up refusal: exits with a one-line message naming the setting."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def load_settings(cls: type[S], **overrides: Any) -> S:
    """Build settings or raise `SettingsError` with one readable line per problem."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        prefix = (cls.model_config.get("env_prefix") or "").upper()
        problems = []
        for error in exc.errors(include_url=False, include_input=False):
            field = ".".join(str(part) for part in error["loc"])
            name = f"{prefix}{field.upper()}" if field else prefix.rstrip("_")
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{name}: {message}" if field else message)
        raise SettingsError(
            f"{cls.service_name}: invalid configuration: " + "; ".join(problems)
        ) from None
