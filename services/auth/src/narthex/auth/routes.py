"""HTTP routes of the auth service: token exchange, JWKS, a tenant's own keys, admin."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, TypedDict

from fastapi import APIRouter, Depends, Form, Header, Request, Response
from fastapi.responses import JSONResponse

from narthex.auth import schemas
from narthex.auth.errors import InvalidCredentials
from narthex.auth.records import KeyRecord, PlanRecord, TenantRecord
from narthex.auth.service import AuthService
from narthex.common.authn import CurrentPrincipal, require_admin, require_scope
from narthex.common.errors import BadRequest
from narthex.common.openapi import error_responses
from narthex.common.plans import TenantLimits
from narthex.common.scopes import KEYS
from narthex.common.tokens import Principal, TokenVerifier

router = APIRouter()


class AuthState(TypedDict):
    """What auth's lifespan yields; each request finds it in `scope["state"]`."""

    auth: AuthService
    verifier: TokenVerifier  # its own key ring's, for RequireTokenMiddleware


async def _service(request: Request) -> AuthService:
    service: AuthService = request.scope["state"]["auth"]
    return service


Service = Annotated[AuthService, Depends(_service)]
TenantCaller = Annotated[Principal, require_scope(KEYS)]
AdminCaller = Annotated[Principal, require_admin()]


def _key(record: KeyRecord) -> schemas.Key:
    return schemas.Key(
        id=record.id,
        prefix=f"nx_{record.env}_{record.id}",
        name=record.name,
        tenant_id=record.tenant_id,
        created_at=record.created_at,
        expires_at=record.expires_at,
        last_used_at=record.last_used_at,
        revoked_at=record.revoked_at,
        replaced_by=record.replaced_by,
    )


def _created(key: str, record: KeyRecord) -> schemas.CreatedKey:
    return schemas.CreatedKey(key=key, **_key(record).model_dump())


def _tenant(record: TenantRecord) -> schemas.Tenant:
    return schemas.Tenant(
        id=record.id,
        name=record.name,
        plan=record.plan_name,
        roles=list(record.roles),
        created_at=record.created_at,
        disabled_at=record.disabled_at,
    )


def _plan(record: PlanRecord) -> schemas.Plan:
    return schemas.Plan(
        name=record.name,
        rate_per_second=record.rate_per_second,
        burst=record.burst,
        daily_quota=record.daily_quota,
        max_items_per_request=record.max_items_per_request,
        allowed_models=list(record.allowed_models),
        builtin=record.builtin,
    )


# -- token exchange and signing keys (public) ------------------------------------------------
@router.post(
    "/v1/auth/token",
    response_model=schemas.TokenResponse,
    responses=error_responses(401),
    tags=["tokens"],
    summary="Exchange an API key for a JWT (header, or OAuth2 client credentials)",
)
async def token(
    service: Service,
    response: Response,
    x_api_key: Annotated[str | None, Header()] = None,
    authorization: Annotated[str | None, Header()] = None,
    grant_type: Annotated[str | None, Form()] = None,
    client_id: Annotated[str | None, Form()] = None,
    client_secret: Annotated[str | None, Form()] = None,
    scope: Annotated[str | None, Form()] = None,
) -> schemas.TokenResponse:
    presented = x_api_key
    if presented is None and authorization and authorization[:7].lower() == "bearer ":
        presented = authorization[7:].strip()
    if presented is None and grant_type is not None:
        if grant_type != "client_credentials":
            raise BadRequest("grant_type must be client_credentials")
        if not client_secret:
            raise InvalidCredentials()
        presented = client_secret
        # The client id names the key; a secret presented under another id is refused.
        if client_id is None or f"_{client_id}_" not in presented:
            raise InvalidCredentials()
    if not presented:
        raise InvalidCredentials()
    issued = await service.exchange(presented, scope.split() if scope else None)
    response.headers["Cache-Control"] = "no-store"
    return schemas.TokenResponse(
        access_token=issued.token,
        expires_in=issued.expires_in,
        scope=" ".join(sorted(issued.scopes)),
    )


@router.get("/.well-known/jwks.json", tags=["tokens"], summary="Public signing keys (JWKS)")
async def jwks(service: Service) -> JSONResponse:
    return JSONResponse(service.keyring.jwks(), headers={"Cache-Control": "public, max-age=60"})


@router.get(
    "/internal/v1/revocations",
    response_model=schemas.RevocationList,
    tags=["tokens"],
    summary="Keys and tenants whose still-unexpired tokens verifiers must refuse",
)
async def revocations(service: Service) -> schemas.RevocationList:
    # Unauthenticated, as JWKS is: a revoked key's id or a disabled tenant's id gives
    # no one anything, and every verifier needs the list. The gateway does not route
    # /internal paths, so only the mesh reaches it.
    found = await service.revocations()
    return schemas.RevocationList(
        keys=found.keys, tenants=found.tenants, window_seconds=found.window_seconds
    )


@router.get(
    "/v1/auth/limits",
    response_model=TenantLimits,
    tags=["tokens"],
    summary="The caller's current plan limits (read by the gateway, cached briefly)",
)
async def my_limits(service: Service, caller: CurrentPrincipal) -> TenantLimits:
    # The tenant's plan as it is now, not as it was when the token was issued: a plan
    # change takes effect without waiting for tokens to expire.
    tenant, plan = await service.limits(caller.tenant)
    return TenantLimits(
        tenant=tenant.id,
        plan=plan.name,
        rate_per_second=plan.rate_per_second,
        burst=plan.burst,
        daily_quota=plan.daily_quota,
        max_items_per_request=plan.max_items_per_request,
        allowed_models=tuple(plan.allowed_models),
    )


# -- a tenant's own keys --------------------------------------------------------------------
@router.get("/v1/keys", response_model=list[schemas.Key], tags=["keys"])
async def my_keys(service: Service, caller: TenantCaller) -> list[schemas.Key]:
    return [_key(k) for k in await service.list_keys(caller.tenant)]


@router.post("/v1/keys", response_model=schemas.CreatedKey, status_code=201, tags=["keys"])
async def create_my_key(
    body: schemas.KeyCreate, service: Service, caller: TenantCaller
) -> schemas.CreatedKey:
    key, record = await service.create_key(
        caller.tenant, body.name, body.expires_at, actor=caller.tenant
    )
    return _created(str(key), record)


@router.delete("/v1/keys/{key_id}", response_model=schemas.Key, tags=["keys"])
async def revoke_my_key(key_id: str, service: Service, caller: TenantCaller) -> schemas.Key:
    return _key(await service.revoke_key(key_id, actor=caller.tenant, tenant_id=caller.tenant))


@router.post(
    "/v1/keys/{key_id}/rotate",
    response_model=schemas.Rotated,
    responses=error_responses(409),
    tags=["keys"],
)
async def rotate_my_key(key_id: str, service: Service, caller: TenantCaller) -> schemas.Rotated:
    old, key, new = await service.rotate_key(key_id, actor=caller.tenant, tenant_id=caller.tenant)
    return schemas.Rotated(old=_key(old), new=_created(str(key), new))


# -- admin ----------------------------------------------------------------------------------
@router.get("/v1/admin/tenants", response_model=list[schemas.Tenant], tags=["admin"])
async def list_tenants(service: Service, _: AdminCaller) -> list[schemas.Tenant]:
    return [_tenant(t) for t in await service.store.list_tenants()]


@router.post(
    "/v1/admin/tenants",
    response_model=schemas.Tenant,
    status_code=201,
    responses=error_responses(409),
    tags=["admin"],
)
async def create_tenant(
    body: schemas.TenantCreate, service: Service, caller: AdminCaller
) -> schemas.Tenant:
    return _tenant(await service.create_tenant(body.name, body.plan, body.roles, caller.tenant))


@router.get("/v1/admin/tenants/{tenant_id}", response_model=schemas.Tenant, tags=["admin"])
async def get_tenant(tenant_id: str, service: Service, _: AdminCaller) -> schemas.Tenant:
    return _tenant(await service.tenant(tenant_id))


@router.patch("/v1/admin/tenants/{tenant_id}", response_model=schemas.Tenant, tags=["admin"])
async def update_tenant(
    tenant_id: str, body: schemas.TenantUpdate, service: Service, caller: AdminCaller
) -> schemas.Tenant:
    return _tenant(await service.set_plan(tenant_id, body.plan, caller.tenant))


@router.post("/v1/admin/tenants/{tenant_id}/disable", response_model=schemas.Tenant, tags=["admin"])
async def disable_tenant(tenant_id: str, service: Service, caller: AdminCaller) -> schemas.Tenant:
    """Its keys stop exchanging at once; its tokens are refused by verifiers within their
    revocation poll."""
    return _tenant(await service.set_disabled(tenant_id, True, caller.tenant))


@router.post("/v1/admin/tenants/{tenant_id}/enable", response_model=schemas.Tenant, tags=["admin"])
async def enable_tenant(tenant_id: str, service: Service, caller: AdminCaller) -> schemas.Tenant:
    return _tenant(await service.set_disabled(tenant_id, False, caller.tenant))


@router.get("/v1/admin/tenants/{tenant_id}/keys", response_model=list[schemas.Key], tags=["admin"])
async def tenant_keys(tenant_id: str, service: Service, _: AdminCaller) -> list[schemas.Key]:
    await service.tenant(tenant_id)
    return [_key(k) for k in await service.list_keys(tenant_id)]


@router.post(
    "/v1/admin/tenants/{tenant_id}/keys",
    response_model=schemas.CreatedKey,
    status_code=201,
    tags=["admin"],
)
async def create_tenant_key(
    tenant_id: str, body: schemas.KeyCreate, service: Service, caller: AdminCaller
) -> schemas.CreatedKey:
    key, record = await service.create_key(tenant_id, body.name, body.expires_at, caller.tenant)
    return _created(str(key), record)


@router.delete("/v1/admin/keys/{key_id}", response_model=schemas.Key, tags=["admin"])
async def revoke_key(key_id: str, service: Service, caller: AdminCaller) -> schemas.Key:
    return _key(await service.revoke_key(key_id, actor=caller.tenant))


@router.post(
    "/v1/admin/keys/{key_id}/rotate",
    response_model=schemas.Rotated,
    responses=error_responses(409),
    tags=["admin"],
)
async def rotate_key(key_id: str, service: Service, caller: AdminCaller) -> schemas.Rotated:
    old, key, new = await service.rotate_key(key_id, actor=caller.tenant)
    return schemas.Rotated(old=_key(old), new=_created(str(key), new))


@router.get("/v1/admin/plans", response_model=list[schemas.Plan], tags=["admin"])
async def list_plans(service: Service, _: AdminCaller) -> list[schemas.Plan]:
    return [_plan(p) for p in await service.store.list_plans()]


@router.post(
    "/v1/admin/plans",
    response_model=schemas.Plan,
    status_code=201,
    responses=error_responses(409),
    tags=["admin"],
)
async def create_plan(
    body: schemas.PlanCreate, service: Service, caller: AdminCaller
) -> schemas.Plan:
    return _plan(await service.create_plan(caller.tenant, **body.model_dump()))


@router.patch("/v1/admin/plans/{name}", response_model=schemas.Plan, tags=["admin"])
async def update_plan(
    name: str, body: schemas.PlanUpdate, service: Service, caller: AdminCaller
) -> schemas.Plan:
    changes = body.model_dump(exclude_none=True)
    return _plan(await service.update_plan(name, caller.tenant, **changes))


@router.get("/v1/admin/audit", response_model=list[schemas.AuditEntry], tags=["admin"])
async def audit(service: Service, _: AdminCaller, limit: int = 100) -> list[schemas.AuditEntry]:
    entries = await service.store.list_audit(limit=max(1, min(limit, 1000)))
    return [
        schemas.AuditEntry(
            at=e.at, actor=e.actor, action=e.action, target=e.target, detail=e.detail
        )
        for e in entries
    ]


@router.post(
    "/v1/admin/signing-keys/rotate", response_model=schemas.SigningRotation, tags=["admin"]
)
async def rotate_signing_key(service: Service, caller: AdminCaller) -> schemas.SigningRotation:
    key = service.keyring.rotate(service.settings.signing_key_publish_seconds)
    await service.store.record(caller.tenant, "signing-key.rotate", key.kid, {})
    promote_at = service.keyring.promote_at or 0.0
    return schemas.SigningRotation(kid=key.kid, signs_from=datetime.fromtimestamp(promote_at, UTC))
