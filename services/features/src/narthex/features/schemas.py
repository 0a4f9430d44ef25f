"""Request and response bodies of event ingestion and batchGet."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema

from narthex.transactions import FEATURES, USD_RATES, Channel
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
        "event_id": {**_ID_SCHEMA, "description": "unique per account; a replay is ignored"},
        "account_id": {**_ID_SCHEMA, "description": "the entity whose aggregates it updates"},
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


EntityId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]


class BatchGetRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    entities: list[EntityId] = Field(description="account ids, 0 to max_entities")
    at: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="the instant the aggregates are read at, UTC epoch seconds (default: now)",
    )


class EntityFeatures(BaseModel):
    entity: str
    known: bool = Field(description="false: no event kept for it; `values` are the defaults")
    values: dict[str, float] = Field(description="every feature of `schema`, by name")
    age_seconds: float | None = Field(
        description="`as_of` minus the entity's newest event time (null when unknown)"
    )


class BatchGetResponse(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    feature_names: list[str] = Field(
        alias="schema", description="the feature names, in order", examples=[list(FEATURES)]
    )
    as_of: float = Field(description="the instant read at, UTC epoch seconds")
    features: list[EntityFeatures] = Field(description="one per entity asked, in that order")
