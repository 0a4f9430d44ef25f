"""HTTP routes: a tenant's transaction event ingestion, and batchGet for the inference service."""

from __future__ import annotations

from typing import Annotated, TypedDict

from fastapi import APIRouter, Depends, Request, Response

from narthex.common import scopes
from narthex.common.authn import require_role, require_scope
from narthex.common.tokens import Principal
from narthex.features.schemas import IngestRequest, IngestResponse
from narthex.features.service import FeaturesService
from narthex.features.store import FeatureStore
from narthex.transactions.lookup import (
    BATCH_GET,
    BatchGetRequest,
    BatchGetResponse,
    encode_answer,
)

router = APIRouter()


class FeaturesState(TypedDict):
    """What the features lifespan yields; each request finds it in `scope["state"]`."""

    service: FeaturesService
    store: FeatureStore


async def _service(request: Request) -> FeaturesService:
    service: FeaturesService = request.scope["state"]["service"]
    return service


Service = Annotated[FeaturesService, Depends(_service)]
Producer = Annotated[Principal, require_scope(scopes.EVENTS)]


@router.post(
    "/v1/events/transactions",
    tags=["events"],
    summary="Count a batch of transaction events in the caller's accounts' aggregates",
)
async def ingest_transactions(
    body: IngestRequest, service: Service, caller: Producer
) -> IngestResponse:
    """Idempotent by event id: sending a batch again changes nothing. One invalid event
    refuses the whole batch (422 naming `events[i].field`) and nothing is counted. The
    accounts are the caller's tenant's: another tenant's account of the same id, and its
    event ids, are untouched."""
    counts = await service.ingest(caller.tenant, body.events)
    return IngestResponse(
        accepted=counts.accepted, duplicates=counts.duplicates, stale=counts.stale
    )


@router.post(
    BATCH_GET,
    tags=["internal"],
    # A service identity only (the inference service's own credential): it names each
    # entity's tenant, which a tenant's token must never be able to do.
    dependencies=[require_role(scopes.SERVICE), require_scope(scopes.FEATURES_LOOKUP)],
    response_model=BatchGetResponse,
    summary="Aggregates of many tenants' accounts at one instant (for the inference service)",
)
async def batch_get(body: BatchGetRequest, service: Service) -> Response:
    """Unknown entities get the declared defaults, with `known: false`."""
    as_of, answer = await service.batch_get(body.entity_ids(), body.at)
    return Response(encode_answer(as_of, answer), media_type="application/json")
