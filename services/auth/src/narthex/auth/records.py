"""What the auth store hands out: frozen records (never ORM rows), and how a row becomes one."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypedDict

from narthex.auth.models import ApiKey, AuditLog, Plan, Tenant

__all__ = [
    "AuditEntry",
    "AuditRecord",
    "KeyRecord",
    "PlanChanges",
    "PlanRecord",
    "ResolvedKey",
    "Rotation",
    "TenantRecord",
    "audit_record",
    "key_record",
    "plan_record",
    "tenant_record",
    "utc",
]


@dataclass(frozen=True, slots=True)
class PlanRecord:
    name: str
    rate_per_second: float
    burst: int
    daily_quota: int
    max_items_per_request: int
    allowed_models: tuple[str, ...]
    builtin: bool
    created_at: datetime

    def allows_model(self, model: str) -> bool:
        # An empty list means no restriction, not "nothing allowed".
        return not self.allowed_models or model in self.allowed_models


@dataclass(frozen=True, slots=True)
class TenantRecord:
    id: str
    name: str
    plan_name: str
    roles: tuple[str, ...]
    created_at: datetime
    disabled_at: datetime | None


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    tenant_id: str
    env: str
    name: str
    secret_hash: str = field(repr=False)
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None
    replaced_by: str | None

    def is_active(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True, slots=True)
class ResolvedKey:
    """A key with its tenant and that tenant's plan: all the token exchange needs."""

    key: KeyRecord
    tenant: TenantRecord
    plan: PlanRecord


class Rotation(NamedTuple):
    """The old key (now with its grace expiry and successor) and the new one."""

    old: KeyRecord
    new: KeyRecord


@dataclass(frozen=True, slots=True)
class AuditRecord:
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    detail: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """The audit line a mutating method writes in its own transaction.

    `target` defaults to what the mutation touches (the new tenant's id, the plan name, the
    key id), which the caller may not know before the call.
    """

    actor: str
    action: str
    target: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


class PlanChanges(TypedDict, total=False):
    rate_per_second: float
    burst: int
    daily_quota: int
    max_items_per_request: int
    allowed_models: Sequence[str]


def utc(value: datetime | None) -> datetime | None:
    # A row written in this call still holds the caller's offset; make it look like a read.
    return None if value is None else value.astimezone(UTC)


def plan_record(row: Plan) -> PlanRecord:
    return PlanRecord(
        name=row.name,
        rate_per_second=row.rate_per_second,
        burst=row.burst,
        daily_quota=row.daily_quota,
        max_items_per_request=row.max_items_per_request,
        allowed_models=tuple(row.allowed_models),
        builtin=row.builtin,
        created_at=row.created_at,
    )


def tenant_record(row: Tenant) -> TenantRecord:
    return TenantRecord(
        id=row.id,
        name=row.name,
        plan_name=row.plan_name,
        roles=tuple(row.roles),
        created_at=row.created_at,
        disabled_at=utc(row.disabled_at),
    )


def key_record(row: ApiKey) -> KeyRecord:
    return KeyRecord(
        id=row.id,
        tenant_id=row.tenant_id,
        env=row.env,
        name=row.name,
        secret_hash=row.secret_hash,
        created_at=row.created_at,
        expires_at=utc(row.expires_at),
        last_used_at=utc(row.last_used_at),
        revoked_at=utc(row.revoked_at),
        replaced_by=row.replaced_by,
    )


def audit_record(row: AuditLog) -> AuditRecord:
    return AuditRecord(
        id=row.id,
        at=row.at,
        actor=row.actor,
        action=row.action,
        target=row.target,
        detail=row.detail,
    )
