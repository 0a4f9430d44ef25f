"""batchGet as both sides speak it: the features service's path, its request and its answer.

The inference service asks for entities, each an account named with its tenant (two
tenants' accounts of the same id are two entities), at one instant; the features service
answers each one's aggregates (`FEATURES`; the declared `DEFAULTS` for an unknown one)
with their freshness. The pydantic models validate and document the shapes; on the hot
path `encode_request`, `encode_answer` and `decode_answer` write and read the same shapes
with orjson (a test holds each to its model).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from typing_extensions import TypedDict

from narthex.transactions.aggregates import FEATURES
from narthex.transactions.events import MAX_ID_LENGTH

__all__ = [
    "BATCH_GET",
    "Answer",
    "BatchGetRequest",
    "BatchGetResponse",
    "Entity",
    "EntityFeatures",
    "EntityId",
    "decode_answer",
    "encode_answer",
    "encode_request",
]

BATCH_GET = "/internal/v1/features:batchGet"

# An entity as both sides hold it in memory: (tenant, account).
EntityId = tuple[str, str]

_Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]


class Entity(TypedDict):
    """An account of a tenant. A TypedDict, not a model: validating up to 1000 of them per
    call costs half as much."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]

    tenant: Annotated[_Id, Field(description="the tenant the account belongs to")]
    account: Annotated[_Id, Field(description="the account id, as its transaction events name it")]


class BatchGetRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    entities: list[Entity] = Field(description="accounts with their tenants, 0 to max_entities")
    at: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="the instant the aggregates are read at, UTC epoch seconds (default: now)",
    )

    def entity_ids(self) -> list[EntityId]:
        """The entities asked for, in order."""
        return [(entity["tenant"], entity["account"]) for entity in self.entities]


class EntityFeatures(BaseModel):
    tenant: str
    account: str
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


@dataclass(frozen=True, slots=True)
class Answer:
    """One entity's answer as the features service computes it (`EntityFeatures`' fields)."""

    tenant: str
    account: str
    known: bool
    # In FEATURES order; DEFAULTS for an unknown entity.
    values: dict[str, float]
    # `as_of` minus the entity's newest event time; None for an unknown entity.
    age_seconds: float | None


_SCHEMA = list(FEATURES)


def encode_request(entities: Iterable[EntityId], at: float | None) -> bytes:
    """A `BatchGetRequest` body for the entities, in order."""
    body: dict[str, object] = {
        "entities": [{"tenant": tenant, "account": account} for tenant, account in entities]
    }
    if at is not None:
        body["at"] = at
    return orjson.dumps(body)


def encode_answer(as_of: float, answers: Sequence[Answer]) -> bytes:
    """A `BatchGetResponse` body. orjson from plain dicts (it writes a slotted dataclass
    twice as slowly): ~20 floats per entity through pydantic would cost more than the
    store's round trip."""
    return orjson.dumps(
        {
            "schema": _SCHEMA,
            "as_of": as_of,
            "features": [
                {
                    "tenant": a.tenant,
                    "account": a.account,
                    "known": a.known,
                    "values": a.values,
                    "age_seconds": a.age_seconds,
                }
                for a in answers
            ],
        }
    )


def decode_answer(content: bytes) -> dict[EntityId, dict[str, float]]:
    """Each entity's values (every name of FEATURES) from a batchGet answer, by (tenant,
    account). An answer of another shape raises ValueError, KeyError or TypeError.

    orjson, not `BatchGetResponse.model_validate_json`: half the time per entity, and this
    runs on inference's event loop once per formed batch."""
    body = orjson.loads(content)
    return {
        (item["tenant"], item["account"]): {name: float(item["values"][name]) for name in FEATURES}
        for item in body["features"]
    }
