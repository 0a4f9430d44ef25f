"""Request and response bodies of the auth API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
PlanName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]{1,31}$")]
Role = Annotated[str, StringConstraints(pattern=r"^(admin|tenant)$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenResponse(BaseModel):
    """RFC 6749 section 5.1."""

    access_token: str
    token_type: str = "Bearer"  # noqa: S105 - the OAuth2 token type, not a secret
    expires_in: int
    scope: str


class Plan(BaseModel):
    name: str
    rate_per_second: float
    burst: int
    daily_quota: int
    max_items_per_request: int
    allowed_models: list[str]
    builtin: bool


# The column is a 32-bit INTEGER in PostgreSQL: a larger quota is a 422, not a failed insert.
MAX_DAILY_QUOTA = 2**31 - 1


class PlanCreate(Strict):
    name: PlanName
    rate_per_second: float = Field(gt=0, le=100_000)
    burst: int = Field(ge=1, le=1_000_000)
    daily_quota: int = Field(ge=1, le=MAX_DAILY_QUOTA)
    max_items_per_request: int = Field(ge=1, le=10_000)
    allowed_models: list[Annotated[str, StringConstraints(max_length=64)]] = Field(
        default_factory=list, max_length=100
    )


class PlanUpdate(Strict):
    rate_per_second: float | None = Field(None, gt=0, le=100_000)
    burst: int | None = Field(None, ge=1, le=1_000_000)
    daily_quota: int | None = Field(None, ge=1, le=MAX_DAILY_QUOTA)
    max_items_per_request: int | None = Field(None, ge=1, le=10_000)
    allowed_models: list[Annotated[str, StringConstraints(max_length=64)]] | None = Field(
        None, max_length=100
    )


class Tenant(BaseModel):
    id: str
    name: str
    plan: str
    roles: list[str]
    created_at: datetime
    disabled_at: datetime | None = None


class TenantCreate(Strict):
    name: Name
    plan: PlanName = "standard"
    roles: list[Role] = Field(default_factory=lambda: ["tenant"], min_length=1, max_length=2)


class TenantUpdate(Strict):
    plan: PlanName


class Key(BaseModel):
    """A key as listed: its id and prefix, never its secret."""

    id: str
    prefix: str
    name: str
    tenant_id: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None
    replaced_by: str | None


class KeyCreate(Strict):
    name: Name = "default"
    expires_at: datetime | None = None


class CreatedKey(Key):
    """Returned once, when a key is made: the only time its secret is shown."""

    key: str


class Rotated(BaseModel):
    old: Key
    new: CreatedKey


class AuditEntry(BaseModel):
    at: datetime
    actor: str
    action: str
    target: str
    detail: dict[str, object]


class RevocationList(BaseModel):
    """What a token verifier must refuse although a token's signature checks (like a
    certificate revocation list: public, since it only helps verifiers)."""

    keys: list[str] = Field(description="ids of keys revoked within the window")
    tenants: list[str] = Field(description="ids of the tenants disabled now")
    window_seconds: int = Field(
        description="how far back the key list goes: any token older has expired"
    )


class SigningRotation(BaseModel):
    kid: str
    signs_from: datetime
