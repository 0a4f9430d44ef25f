"""AuthStore: plans, tenants, API keys and the audit log, one short transaction per method."""

from __future__ import annotations

import secrets
import string
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Unpack

from sqlalchemy import bindparam, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from narthex.auth.errors import Conflict, UnknownKey, UnknownPlan, UnknownTenant
from narthex.auth.models import ApiKey, AuditLog, Plan, Tenant, UTCDateTime
from narthex.auth.records import (
    AuditEntry,
    AuditRecord,
    KeyRecord,
    PlanChanges,
    PlanRecord,
    ResolvedKey,
    Rotation,
    TenantRecord,
    audit_record,
    key_record,
    plan_record,
    tenant_record,
)
from narthex.common.database import Database

_TENANT_ID_ALPHABET = string.ascii_lowercase + string.digits


class AuthStore(Database):
    """Every method is one short transaction and returns frozen records, never ORM rows."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)

    # -- plans ---------------------------------------------------------------------------

    async def list_plans(self) -> list[PlanRecord]:
        async with self._sessions() as session:
            rows = await session.scalars(select(Plan).order_by(Plan.name))
            return [plan_record(row) for row in rows]

    async def get_plan(self, name: str) -> PlanRecord | None:
        async with self._sessions() as session:
            row = await session.get(Plan, name)
            return None if row is None else plan_record(row)

    async def create_plan(
        self,
        name: str,
        *,
        rate_per_second: float,
        burst: int,
        daily_quota: int,
        max_items_per_request: int,
        allowed_models: Sequence[str] = (),
        audit: AuditEntry | None = None,
    ) -> PlanRecord:
        row = Plan(
            name=name,
            rate_per_second=rate_per_second,
            burst=burst,
            daily_quota=daily_quota,
            max_items_per_request=max_items_per_request,
            allowed_models=list(allowed_models),
            builtin=False,
            created_at=_now(),
        )
        try:
            async with self._sessions.begin() as session:
                await _write_audit(session, audit, name)
                session.add(row)
                await session.flush()
        except IntegrityError:
            raise Conflict(f"plan {name!r} already exists") from None
        return plan_record(row)

    async def update_plan(
        self, name: str, *, audit: AuditEntry | None = None, **changes: Unpack[PlanChanges]
    ) -> PlanRecord:
        # Unpack only binds for type checkers: a caller forwarding a parsed body is checked here.
        unknown = set(changes) - PlanChanges.__optional_keys__
        if unknown:
            raise TypeError(f"not plan settings: {', '.join(sorted(unknown))}")
        async with self._sessions.begin() as session:
            await _write_audit(session, audit, name)
            row = await session.get(Plan, name)
            if row is None:
                raise UnknownPlan(name)
            if "rate_per_second" in changes:
                row.rate_per_second = changes["rate_per_second"]
            if "burst" in changes:
                row.burst = changes["burst"]
            if "daily_quota" in changes:
                row.daily_quota = changes["daily_quota"]
            if "max_items_per_request" in changes:
                row.max_items_per_request = changes["max_items_per_request"]
            if "allowed_models" in changes:
                row.allowed_models = list(changes["allowed_models"])
            return plan_record(row)

    # -- tenants -------------------------------------------------------------------------

    async def create_tenant(
        self,
        name: str,
        plan_name: str,
        roles: Sequence[str],
        *,
        audit: AuditEntry | None = None,
    ) -> TenantRecord:
        row = Tenant(
            id=_new_tenant_id(),
            name=name,
            plan_name=plan_name,
            roles=list(roles),
            created_at=_now(),
            disabled_at=None,
        )
        try:
            async with self._sessions.begin() as session:
                await _write_audit(session, audit, row.id)
                session.add(row)
                await session.flush()
        except IntegrityError:
            # The database refused it; find out which rule (no error-message parsing).
            if await self.get_plan(plan_name) is None:
                raise UnknownPlan(plan_name) from None
            raise Conflict(f"tenant {name!r} already exists") from None
        return tenant_record(row)

    async def get_tenant(self, tenant_id: str) -> TenantRecord | None:
        async with self._sessions() as session:
            row = await session.get(Tenant, tenant_id)
            return None if row is None else tenant_record(row)

    async def get_tenant_by_name(self, name: str) -> TenantRecord | None:
        async with self._sessions() as session:
            row = await session.scalar(select(Tenant).where(Tenant.name == name))
            return None if row is None else tenant_record(row)

    async def list_tenants(self) -> list[TenantRecord]:
        async with self._sessions() as session:
            rows = await session.scalars(select(Tenant).order_by(Tenant.name))
            return [tenant_record(row) for row in rows]

    async def set_tenant_plan(
        self, tenant_id: str, plan_name: str, *, audit: AuditEntry | None = None
    ) -> TenantRecord:
        try:
            async with self._sessions.begin() as session:
                await _write_audit(session, audit, tenant_id)
                row = await session.get(Tenant, tenant_id)
                if row is None:
                    raise UnknownTenant(tenant_id)
                row.plan_name = plan_name
                await session.flush()
        except IntegrityError:
            raise UnknownPlan(plan_name) from None
        return tenant_record(row)

    async def set_tenant_disabled(
        self, tenant_id: str, disabled_at: datetime | None, *, audit: AuditEntry | None = None
    ) -> TenantRecord:
        """Disable a tenant from `disabled_at` on, or enable it again with None."""
        async with self._sessions.begin() as session:
            await _write_audit(session, audit, tenant_id)
            row = await session.get(Tenant, tenant_id)
            if row is None:
                raise UnknownTenant(tenant_id)
            row.disabled_at = disabled_at
            return tenant_record(row)

    async def disabled_tenant_ids(self) -> list[str]:
        """Every tenant that is disabled now (disabled from any time on)."""
        statement = select(Tenant.id).where(Tenant.disabled_at.is_not(None)).order_by(Tenant.id)
        async with self._sessions() as session:
            return list(await session.scalars(statement))

    # -- API keys ------------------------------------------------------------------------

    async def add_key(
        self,
        tenant_id: str,
        key_id: str,
        env: str,
        name: str,
        secret_hash: str,
        expires_at: datetime | None = None,
        *,
        audit: AuditEntry | None = None,
    ) -> KeyRecord:
        row = _new_key_row(key_id, tenant_id, env, name, secret_hash, expires_at)
        try:
            async with self._sessions.begin() as session:
                await _write_audit(session, audit, key_id)
                session.add(row)
                await session.flush()
        except IntegrityError:
            if await self.get_tenant(tenant_id) is None:
                raise UnknownTenant(tenant_id) from None
            raise Conflict(f"key id {key_id!r} is taken") from None
        return key_record(row)

    async def get_key(self, key_id: str) -> ResolvedKey | None:
        """The key, its tenant and their plan in one round trip (the token-exchange path)."""
        statement = (
            select(ApiKey, Tenant, Plan)
            .join(Tenant, ApiKey.tenant_id == Tenant.id)
            .join(Plan, Tenant.plan_name == Plan.name)
            .where(ApiKey.id == key_id)
        )
        async with self._sessions() as session:
            found = (await session.execute(statement)).one_or_none()
            if found is None:
                return None
            key, tenant, plan = found
            return ResolvedKey(key_record(key), tenant_record(tenant), plan_record(plan))

    async def list_keys(self, tenant_id: str) -> list[KeyRecord]:
        statement = (
            select(ApiKey)
            .where(ApiKey.tenant_id == tenant_id)
            .order_by(ApiKey.created_at, ApiKey.id)
        )
        async with self._sessions() as session:
            return [key_record(row) for row in await session.scalars(statement)]

    async def revoked_key_ids(self, since: datetime) -> list[str]:
        """Keys revoked at or after `since`."""
        statement = select(ApiKey.id).where(ApiKey.revoked_at >= since).order_by(ApiKey.id)
        async with self._sessions() as session:
            return list(await session.scalars(statement))

    async def revoke_key(
        self, key_id: str, at: datetime, *, audit: AuditEntry | None = None
    ) -> KeyRecord:
        """Revoke a key; revoking it again keeps the first revocation time."""
        async with self._sessions.begin() as session:
            await _write_audit(session, audit, key_id)
            row = await session.get(ApiKey, key_id)
            if row is None:
                raise UnknownKey(key_id)
            if row.revoked_at is None:
                row.revoked_at = at
            return key_record(row)

    async def rotate_key(
        self,
        old_key_id: str,
        new_key_id: str,
        env: str,
        name: str,
        secret_hash: str,
        grace_until: datetime,
        *,
        expires_at: datetime | None = None,
        audit: AuditEntry | None = None,
    ) -> Rotation:
        """Add a new key for the old key's tenant; the old one lives on until `grace_until`.

        A revoked or already rotated key cannot be rotated (Conflict): rotation is a chain,
        never a fork.
        """
        try:
            async with self._sessions.begin() as session:
                await _write_audit(session, audit, old_key_id)
                # FOR UPDATE (PostgreSQL): two concurrent rotations of one key serialise here
                # and the second sees replaced_by set.
                old = await session.get(ApiKey, old_key_id, with_for_update=True)
                if old is None:
                    raise UnknownKey(old_key_id)
                if old.revoked_at is not None:
                    raise Conflict(f"key {old_key_id!r} is revoked")
                if old.replaced_by is not None:
                    raise Conflict(f"key {old_key_id!r} was already rotated")
                new = _new_key_row(new_key_id, old.tenant_id, env, name, secret_hash, expires_at)
                session.add(new)
                # The models declare no relationship, so the unit of work cannot know that
                # old.replaced_by references the new row: insert it first, explicitly.
                await session.flush()
                if old.expires_at is None or grace_until < old.expires_at:
                    old.expires_at = grace_until
                old.replaced_by = new_key_id
                await session.flush()
        except IntegrityError:
            raise Conflict(f"key id {new_key_id!r} is taken") from None
        return Rotation(old=key_record(old), new=key_record(new))

    async def touch_keys(self, last_used: Mapping[str, datetime]) -> None:
        """Record when keys were last used, in one statement; a time only moves forward."""
        if not last_used:
            return
        seen = bindparam("seen", type_=UTCDateTime())
        statement = (
            update(ApiKey)
            .where(ApiKey.id == bindparam("key_id"))
            # In the WHERE clause rather than read-then-write: replicas flushing overlapping
            # batches cannot move a time backwards whatever order they commit in.
            .where(or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < seen))
            .values(last_used_at=seen)
        )
        # Sorted: concurrent batches lock rows in the same order, so they cannot deadlock.
        params = [{"key_id": key_id, "seen": at} for key_id, at in sorted(last_used.items())]
        # On a plain connection, an executemany of one UPDATE (a session would turn a list
        # of parameters into its own bulk update by primary key, without our WHERE).
        async with self._engine.begin() as connection:
            await connection.execute(statement, params)

    # -- audit ---------------------------------------------------------------------------

    async def record(
        self, actor: str, action: str, target: str, detail: Mapping[str, Any] | None = None
    ) -> AuditRecord:
        row = _audit_row(AuditEntry(actor, action, target, detail or {}), target)
        async with self._sessions.begin() as session:
            session.add(row)
        return audit_record(row)

    async def list_audit(self, limit: int = 100) -> list[AuditRecord]:
        """The latest `limit` entries, newest first."""
        statement = select(AuditLog).order_by(AuditLog.id.desc()).limit(limit)
        async with self._sessions() as session:
            return [audit_record(row) for row in await session.scalars(statement)]


async def _write_audit(session: AsyncSession, audit: AuditEntry | None, target: str) -> None:
    if audit is None:
        return
    session.add(_audit_row(audit, target))
    # Written before the mutation: if the mutation then fails, the rollback visibly takes
    # this line with it (the tests rely on that order to prove the shared transaction).
    await session.flush()


def _audit_row(entry: AuditEntry, target: str) -> AuditLog:
    return AuditLog(
        at=_now(),
        actor=entry.actor,
        action=entry.action,
        target=entry.target if entry.target is not None else target,
        detail=dict(entry.detail),
    )


def _now() -> datetime:
    return datetime.now(UTC)


def _new_key_row(
    key_id: str,
    tenant_id: str,
    env: str,
    name: str,
    secret_hash: str,
    expires_at: datetime | None,
) -> ApiKey:
    """A key as it is first written: never used, revoked or replaced yet."""
    return ApiKey(
        id=key_id,
        tenant_id=tenant_id,
        env=env,
        name=name,
        secret_hash=secret_hash,
        created_at=_now(),
        expires_at=expires_at,
        last_used_at=None,
        revoked_at=None,
        replaced_by=None,
    )


def _new_tenant_id() -> str:
    return "t_" + "".join(secrets.choice(_TENANT_ID_ALPHABET) for _ in range(16))
