"""Identity logic: API keys, token exchange, tenants and plans, each admin action audited."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from narthex.auth.errors import (
    AlreadyBootstrapped,
    InvalidCredentials,
    InvalidScope,
    UnknownPlan,
)
from narthex.auth.records import AuditEntry, KeyRecord, PlanRecord, TenantRecord
from narthex.auth.settings import AuthSettings
from narthex.auth.signing import SigningKeyRing
from narthex.auth.store import AuthStore
from narthex.common.apikeys import (
    ApiKey,
    generate_api_key,
    hash_secret,
    parse_api_key,
    secret_matches,
)
from narthex.common.errors import BadRequest, Conflict, Forbidden, NotFound, ValidationFailed
from narthex.common.scopes import ADMIN, SERVICE, TENANT, scopes_for
from narthex.common.tokens import issue_token

log = structlog.get_logger("narthex.auth")

# A service identity's plan: never used for limits (no service scope reaches the edge's
# limited routes), but every tenant row names one.
SERVICE_PLAN = "free"
# Verifiers accept a token up to 30 s past its `exp`; a minute more covers clock skew
# between this service and them.
REVOCATION_LEEWAY = 30 + 60


@contextmanager
def _as_problems() -> Iterator[None]:
    """The store's refusals are Problems already, but for one: a plan named in a request
    body that does not exist. The body is wrong; nothing at the URL is missing."""
    try:
        yield
    except UnknownPlan as exc:
        raise ValidationFailed(exc.detail) from None


@dataclass(frozen=True)
class IssuedToken:
    token: str
    expires_in: int
    scopes: frozenset[str]


@dataclass(frozen=True)
class Revocations:
    """What verifiers must refuse although the signature checks: tokens minted from these
    keys, and every token of these tenants."""

    keys: list[str]
    tenants: list[str]
    window_seconds: int


def _now() -> datetime:
    return datetime.now(UTC)


class AuthService:
    def __init__(self, store: AuthStore, keyring: SigningKeyRing, settings: AuthSettings) -> None:
        self.store = store
        self.keyring = keyring
        self.settings = settings
        self._pepper = settings.key_pepper.get_secret_value()
        # key id -> last exchange: written in batches, never once per request.
        self._last_used: dict[str, datetime] = {}

    # -- token exchange --------------------------------------------------------------------
    async def exchange(
        self, presented: str, requested_scopes: Iterable[str] | None = None
    ) -> IssuedToken:
        parsed = parse_api_key(presented)
        if parsed is None:
            raise InvalidCredentials()
        found = await self.store.get_key(parsed.key_id)
        if found is None:
            raise InvalidCredentials()
        key, tenant, plan = found.key, found.tenant, found.plan
        now = _now()
        if (
            not secret_matches(self._pepper, parsed.secret, key.secret_hash)
            or key.env != parsed.env
            or key.revoked_at is not None
            or (key.expires_at is not None and key.expires_at <= now)
            or tenant.disabled_at is not None
        ):
            raise InvalidCredentials()
        granted = scopes_for(frozenset(tenant.roles))
        if requested_scopes is not None:
            requested = frozenset(requested_scopes)
            if not requested <= granted:
                raise InvalidScope(f"not granted: {' '.join(sorted(requested - granted))}")
            granted = requested
        ttl = self.settings.token_ttl_seconds
        if key.expires_at is not None:
            # A token never outlives its key (an expiring key, a rotated key's grace).
            ttl = min(ttl, max(1, int((key.expires_at - now).total_seconds())))
        token = issue_token(
            self.keyring.signing_key(),
            issuer=self.settings.jwt_issuer,
            audience=self.settings.jwt_audience,
            subject=tenant.id,
            plan=plan.name,
            roles=list(tenant.roles),
            scopes=sorted(granted),
            ttl=ttl,
            client_id=key.id,
        )
        self._last_used[key.id] = now
        return IssuedToken(token, ttl, granted)

    def revocation_window(self) -> int:
        """How far back a revocation still matters: a token minted just before it lives
        `token_ttl_seconds`, accepted `REVOCATION_LEEWAY` more by verifiers."""
        return self.settings.token_ttl_seconds + REVOCATION_LEEWAY

    async def revocations(self) -> Revocations:
        window = self.revocation_window()
        since = _now() - timedelta(seconds=window)
        keys = await self.store.revoked_key_ids(since)
        tenants = await self.store.disabled_tenant_ids()
        return Revocations(keys, tenants, window)

    async def flush_last_used(self) -> None:
        if not self._last_used:
            return
        batch, self._last_used = self._last_used, {}
        await self.store.touch_keys(batch)

    async def flush_last_used_forever(self) -> None:
        """Background task of the lifespan: one write per interval, whatever the traffic."""
        while True:
            await asyncio.sleep(self.settings.last_used_flush_seconds)
            try:
                await self.flush_last_used()
            except Exception:
                log.exception("could not record key last-used times")

    # -- keys ------------------------------------------------------------------------------
    def _new_key(self) -> tuple[ApiKey, str]:
        key = generate_api_key(self.settings.key_env())
        return key, hash_secret(self._pepper, key.secret)

    async def create_key(
        self,
        tenant_id: str,
        name: str,
        expires_at: datetime | None,
        actor: str,
        *,
        allow_service: bool = False,
    ) -> tuple[ApiKey, KeyRecord]:
        """`allow_service`: the operator's tooling, which alone makes a service identity's
        keys (through the API an admin could otherwise mint itself a service credential)."""
        tenant = await self.store.get_tenant(tenant_id)
        if tenant is None:
            raise NotFound("no such tenant")
        if not allow_service:
            _refuse_service_identity(tenant)
        if expires_at is not None and expires_at.utcoffset() is None:
            # A naive time would be compared with an aware one (a 500) or guessed at.
            raise BadRequest("expires_at needs a UTC offset, e.g. 2030-01-01T00:00:00Z")
        if expires_at is not None and expires_at <= _now():
            raise BadRequest("expires_at must be in the future")
        key, secret_hash = self._new_key()
        with _as_problems():
            record = await self.store.add_key(
                tenant_id,
                key.key_id,
                key.env,
                name,
                secret_hash,
                expires_at=expires_at,
                audit=AuditEntry(actor, "key.create", key.key_id, {"tenant": tenant_id}),
            )
        return key, record

    async def list_keys(self, tenant_id: str) -> list[KeyRecord]:
        return await self.store.list_keys(tenant_id)

    async def _owned_key(self, key_id: str, tenant_id: str | None) -> KeyRecord:
        found = await self.store.get_key(key_id)
        if found is None:
            raise NotFound("no such key")
        if tenant_id is not None and found.key.tenant_id != tenant_id:
            # Key ids are random: saying "not yours" reveals nothing guessable.
            raise Forbidden("the key belongs to another tenant")
        return found.key

    async def revoke_key(self, key_id: str, actor: str, tenant_id: str | None = None) -> KeyRecord:
        key = await self._owned_key(key_id, tenant_id)
        if key.revoked_at is not None:
            return key
        return await self.store.revoke_key(
            key_id, _now(), audit=AuditEntry(actor, "key.revoke", key_id, {"tenant": key.tenant_id})
        )

    async def rotate_key(
        self,
        key_id: str,
        actor: str,
        tenant_id: str | None = None,
        *,
        allow_service: bool = False,
    ) -> tuple[KeyRecord, ApiKey, KeyRecord]:
        old = await self._owned_key(key_id, tenant_id)
        if old.revoked_at is not None:
            raise Conflict("a revoked key cannot be rotated")
        if not allow_service:
            owner = await self.store.get_tenant(old.tenant_id)
            if owner is not None:
                _refuse_service_identity(owner)
        key, secret_hash = self._new_key()
        grace_until = _now() + timedelta(seconds=self.settings.key_rotation_grace_seconds)
        with _as_problems():
            rotation = await self.store.rotate_key(
                key_id,
                key.key_id,
                key.env,
                old.name,
                secret_hash,
                grace_until,
                audit=AuditEntry(
                    actor, "key.rotate", key_id, {"tenant": old.tenant_id, "new": key.key_id}
                ),
            )
        return rotation.old, key, rotation.new

    # -- tenants and plans -----------------------------------------------------------------
    async def create_tenant(
        self, name: str, plan: str, roles: Iterable[str], actor: str
    ) -> TenantRecord:
        with _as_problems():
            return await self.store.create_tenant(
                name,
                plan,
                sorted(set(roles)),
                audit=AuditEntry(actor, "tenant.create", None, {"name": name, "plan": plan}),
            )

    async def tenant(self, tenant_id: str) -> TenantRecord:
        tenant = await self.store.get_tenant(tenant_id)
        if tenant is None:
            raise NotFound("no such tenant")
        return tenant

    async def limits(self, tenant_id: str) -> tuple[TenantRecord, PlanRecord]:
        tenant = await self.tenant(tenant_id)
        plan = await self.store.get_plan(tenant.plan_name)
        if plan is None:  # a foreign key guarantees it; a clear error if that ever breaks
            raise NotFound("the tenant's plan is gone")
        return tenant, plan

    async def set_disabled(self, tenant_id: str, disabled: bool, actor: str) -> TenantRecord:
        """Disable a tenant (its keys stop exchanging; verifiers refuse its tokens) or
        enable it again. Disabling a disabled tenant keeps the first time."""
        tenant = await self.tenant(tenant_id)
        if disabled == (tenant.disabled_at is not None):
            return tenant
        action = "tenant.disable" if disabled else "tenant.enable"
        with _as_problems():
            return await self.store.set_tenant_disabled(
                tenant_id,
                _now() if disabled else None,
                audit=AuditEntry(actor, action, tenant_id),
            )

    async def set_plan(self, tenant_id: str, plan: str, actor: str) -> TenantRecord:
        with _as_problems():
            return await self.store.set_tenant_plan(
                tenant_id, plan, audit=AuditEntry(actor, "tenant.plan", tenant_id, {"plan": plan})
            )

    async def create_plan(self, actor: str, **fields: Any) -> PlanRecord:
        with _as_problems():
            return await self.store.create_plan(
                audit=AuditEntry(actor, "plan.create", str(fields["name"])), **fields
            )

    async def update_plan(self, name: str, actor: str, **changes: Any) -> PlanRecord:
        if not changes:
            raise BadRequest("nothing to change")
        if await self.store.get_plan(name) is None:
            raise NotFound("no such plan")
        with _as_problems():
            return await self.store.update_plan(
                name, audit=AuditEntry(actor, "plan.update", name, dict(changes)), **changes
            )

    async def bootstrap(self, name: str = "operator") -> tuple[TenantRecord, ApiKey]:
        """The first admin tenant and its key. Once: a second call is refused."""
        if any(ADMIN in t.roles for t in await self.store.list_tenants()):
            raise AlreadyBootstrapped("an admin tenant exists already")
        tenant = await self.create_tenant(name, "enterprise", [ADMIN], actor="bootstrap")
        key, _ = await self.create_key(tenant.id, "bootstrap", None, actor="bootstrap")
        return tenant, key

    async def ensure_tenant(self, name: str, plan: str, actor: str) -> TenantRecord:
        existing = await self.store.get_tenant_by_name(name)
        return existing or await self.create_tenant(name, plan, [TENANT], actor)

    async def ensure_service(self, name: str, actor: str) -> TenantRecord:
        """A service identity (role `service` alone): made once, found after."""
        existing = await self.store.get_tenant_by_name(name)
        if existing is None:
            return await self.create_tenant(name, SERVICE_PLAN, [SERVICE], actor)
        if list(existing.roles) != [SERVICE]:
            raise Conflict(f"{name!r} is a tenant, not a service identity")
        return existing

    async def fresh_key(self, tenant_id: str, name: str, actor: str) -> tuple[ApiKey, int]:
        """A new key named `name`, and how many earlier live keys of that name it retires.

        For provisioning that runs again and again (`narthex up`): a key is shown only
        once, so each run makes its own rather than letting unknown live keys pile up.
        """
        earlier = [
            k for k in await self.list_keys(tenant_id) if k.name == name and k.revoked_at is None
        ]
        for record in earlier:
            await self.revoke_key(record.id, actor=actor, tenant_id=tenant_id)
        key, _ = await self.create_key(tenant_id, name, None, actor, allow_service=True)
        return key, len(earlier)


def _refuse_service_identity(tenant: TenantRecord) -> None:
    if SERVICE in tenant.roles:
        raise Forbidden(
            "a service identity's keys are made by the operator's tooling (`narthex up`,"
            " `narthex keys create`), not through the API"
        )
