"""HTTP routes: a tenant's own usage, an operator's usage of any tenant, and drift."""

from __future__ import annotations

from typing import Annotated, Any, TypedDict

from fastapi import APIRouter, Depends, Request

from narthex.analytics.consumer import StreamConsumer
from narthex.analytics.schemas import From, GranularityParam, TenantParam, To
from narthex.analytics.service import AnalyticsService
from narthex.common import scopes
from narthex.common.authn import require_admin, require_scope
from narthex.common.openapi import error_responses
from narthex.common.tokens import Principal

router = APIRouter()


class AnalyticsState(TypedDict):
    """What the analytics lifespan yields; each request finds it in `scope["state"]`."""

    service: AnalyticsService
    consumers: list[StreamConsumer[Any]]  # empty without Redis


async def _service(request: Request) -> AnalyticsService:
    service: AnalyticsService = request.scope["state"]["service"]
    return service


Service = Annotated[AnalyticsService, Depends(_service)]
UsageReader = Annotated[Principal, require_scope(scopes.USAGE)]
Operator = Annotated[Principal, require_admin()]


# A range that is empty, inverted, too long or outside the epoch: 400 `bad-range`.
RANGE_ERRORS = error_responses(400)


@router.get(
    "/v1/usage",
    tags=["usage"],
    summary="The caller's tenant's usage over a range",
    responses=RANGE_ERRORS,
)
async def usage(
    service: Service,
    caller: UsageReader,
    start: From = None,
    end: To = None,
    granularity: GranularityParam = "hour",
) -> dict[str, Any]:
    """Requests, items, errors, 429s and latency quantiles (exact to the bucket) of the
    caller's own tenant, per period and split by API key, model version and route."""
    return await service.usage(caller.tenant, start, end, granularity)


@router.get(
    "/v1/admin/usage",
    tags=["admin"],
    summary="Any tenant's usage (operators)",
    responses=RANGE_ERRORS,
)
async def admin_usage(
    service: Service,
    caller: Operator,
    tenant: TenantParam = None,
    start: From = None,
    end: To = None,
    granularity: GranularityParam = "hour",
) -> dict[str, Any]:
    return await service.usage(tenant, start, end, granularity)


@router.get("/v1/admin/drift", tags=["admin"], summary="PSI of each model version's scores")
async def admin_drift(
    service: Service, caller: Operator, tenant: TenantParam = None
) -> dict[str, Any]:
    """Each model version's score distribution over the window against the baseline in its
    metadata.json; flagged above the threshold. All tenants' predictions together, or one
    tenant's (`tenant`): whose traffic moved."""
    return await service.drift(tenant)
