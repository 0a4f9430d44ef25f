"""The gateway's own routes (everything else is forwarded by the route table)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from narthex.common.errors import Forbidden, NotFound
from narthex.common.openapi import error_responses
from narthex.common.scopes import ADMIN, ADMIN_SCOPE
from narthex.gateway.ratelimit.edge import rate_limit_headers
from narthex.gateway.resources import State
from narthex.gateway.schemas import Bucket, Daily, Quota, UpstreamStatus

router = APIRouter()


@router.get(
    "/v1/quota", response_model=Quota, responses=error_responses(401, 403, 404), tags=["quota"]
)
async def quota(
    request: Request,
    response: Response,
    state: State,
    # A tenant id goes into the path of a call to auth: nothing but an id's characters.
    tenant: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = None,
) -> Quota:
    """The caller's plan, token bucket and daily quota as they stand; an admin may name
    any tenant. Reading it consumes nothing."""
    principal = await state["identity"].authenticate(request.scope)
    plans = state["plans"]
    if tenant is None or tenant == principal.tenant:
        plan = await plans.plan_of(principal)
    elif principal.has_role(ADMIN) and principal.has_scope(ADMIN_SCOPE):
        plan = await plans.plan_for(tenant, principal)
    else:
        raise Forbidden("only an admin may read another tenant's quota")
    decision = await state["limiter"].peek(plan)
    for name, value in rate_limit_headers(decision):
        response.headers[name.decode()] = value.decode()
    return Quota(
        tenant=plan.tenant,
        plan=plan.plan,
        max_items_per_request=plan.max_items_per_request,
        bucket=Bucket(
            capacity=decision.capacity,
            remaining=decision.remaining,
            refill_per_second=decision.refill_rate,
            seconds_until_full=decision.seconds_until_full,
        ),
        daily=Daily(
            limit=decision.quota_limit,
            used=decision.quota_used,
            remaining=decision.quota_remaining,
            seconds_until_reset=decision.quota_reset_seconds,
        ),
    )


@router.get(
    "/v1/status/{upstream}",
    response_model=UpstreamStatus,
    responses={503: {"model": UpstreamStatus, "description": "the upstream is not up"}},
    tags=["status"],
)
async def upstream_status(state: State, upstream: str) -> JSONResponse:
    """An upstream's readiness as the gateway's background probe last found it, and the
    state of the gateway's breaker to it. Public: answered from that probe, so asking
    costs the upstream nothing."""
    health = state["upstreams"]
    if upstream not in health.clients:
        raise NotFound("no such upstream")
    up, report = health.status(upstream)
    body = UpstreamStatus.model_validate(report).model_dump(exclude_none=True)
    return JSONResponse(body, status_code=200 if up else 503)
