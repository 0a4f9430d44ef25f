"""Request and response bodies of event ingestion (batchGet's are `narthex.transactions.lookup`)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from narthex.transactions import USD_RATES, Channel
from narthex.transactions.events import MAX_ID_LENGTH

_ID_SCHEMA = {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH, "pattern": r"^\S+$"}

# What an event looks like, for the API description only: events are parsed as plain
# objects and validated by `narthex.transactions.Transaction`, so that a bad one is named
# by its index and field, and the rules live in one place.
EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "TransactionEvent",
    "required": ["event_id", "account_id", "merchant_id", "amount", "currency", "timestamp"],
    "additionalProperties": False,
    "properties": {
        "event_id": {
            **_ID_SCHEMA,
            "description": "unique per account (of the tenant); a replay is ignored",
        },
        "account_id": {
            **_ID_SCHEMA,
            "description": "the account (of the caller's tenant) whose aggregates it updates",
        },
        "merchant_id": _ID_SCHEMA,
        "amount": {"type": "number", "exclusiveMinimum": 0, "description": "in `currency`"},
        "currency": {"type": "string", "enum": list(USD_RATES)},
        "timestamp": {
            "type": "number",
            "description": "UTC epoch seconds; at most max_future_seconds ahead of server time",
        },
        "channel": {"type": "string", "enum": [c.value for c in Channel], "default": "pos"},
    },
}


class IngestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: Annotated[
        list[Annotated[Any, WithJsonSchema(EVENT_SCHEMA)]],
        Field(
            description="transaction events, 1 to max_batch_events; one bad event refuses"
            " the whole batch",
            json_schema_extra={"minItems": 1},
        ),
    ]


class IngestResponse(BaseModel):
    accepted: int = Field(description="events counted now")
    duplicates: int = Field(description="events whose id was already counted (or repeated)")
    stale: int = Field(description="events too old to count in any window (changed nothing)")
