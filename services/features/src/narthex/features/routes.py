"""HTTP routes: transaction event ingestion, and batchGet for the inference service."""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, Request, Response

from narthex.common import scopes
from narthex.common.authn import require_scope
from narthex.features.schemas import (
    BatchGetRequest,
    BatchGetResponse,
    IngestRequest,
    IngestResponse,
)
from narthex.features.service import FeaturesService
from narthex.transactions import FEATURES

BATCH_GET = "/internal/v1/features:batchGet"
_SCHEMA = list(FEATURES)

router = APIRouter()


async def _service(request: Request) -> FeaturesService:
    service: FeaturesService = request.app.state.service
    return service


Service = Annotated[FeaturesService, Depends(_service)]


@router.post(
    "/v1/events/transactions",
    tags=["events"],
    dependencies=[require_scope(scopes.EVENTS)],
    summary="Count a batch of transaction events in their accounts' aggregates",
)
async def ingest_transactions(body: IngestRequest, service: Service) -> IngestResponse:
    """Idempotent by event id: sending a batch again changes nothing. One invalid event
    refuses the whole batch (422 naming `events[i].field`) and nothing is counted."""
    counts = await service.ingest(body.events)
    return IngestResponse(
        accepted=counts.accepted, duplicates=counts.duplicates, stale=counts.stale
    )


@router.post(
    BATCH_GET,
    tags=["internal"],
    dependencies=[require_scope(scopes.INFERENCE)],
    response_model=BatchGetResponse,
    summary="Aggregates of many accounts at one instant (for the inference service)",
)
async def batch_get(body: BatchGetRequest, service: Service) -> Response:
    """Unknown accounts get the declared defaults, with `known: false`."""
    as_of, answer = await service.batch_get(body.entities, body.at)
    # orjson straight from the dataclasses' fields: ~20 floats per entity through
    # pydantic would cost more than the store's round trip.
    content = {
        "schema": _SCHEMA,
        "as_of": as_of,
        "features": [
            {
                "entity": item.entity,
                "known": item.known,
                "values": item.values,
                "age_seconds": item.age_seconds,
            }
            for item in answer
        ],
    }
    return Response(orjson.dumps(content), media_type="application/json")
