"""The features service's logic: validate and count a tenant's events, answer batchGet."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from narthex.common.errors import ValidationFailed
from narthex.features.errors import StoreUnavailable
from narthex.features.metrics import FeatureMetrics
from narthex.features.store import FeatureStore, FeatureStoreError, IngestCounts
from narthex.transactions import DEFAULTS, InvalidTransaction, Transaction
from narthex.transactions.lookup import Answer, EntityId

__all__ = ["FeaturesService"]

log = structlog.get_logger("narthex.features")

# Problems named in `detail`; the `errors` list names up to _ERRORS_LISTED of them.
_ERRORS_IN_DETAIL = 5
_ERRORS_LISTED = 100

# (where, as in `events[3].amount`; its `loc` in the request; what is wrong)
Issue = tuple[str, list[str | int], str]


def _printable(value: str) -> bool:
    # isprintable() refuses every whitespace character but the ASCII space.
    return value.isprintable() and " " not in value


def _shown(name: str) -> str:
    # A client's field name or id echoed in a problem: escaped unless plainly printable,
    # so that a lone surrogate or a control character cannot break the JSON answer.
    return name if name.isprintable() else ascii(name)


def _refusal(problems: list[Issue]) -> ValidationFailed:
    """A 422 naming each problem as `events[3].amount: ...` (the first few in `detail`)."""
    shown = "; ".join(f"{where}: {message}" for where, _, message in problems[:_ERRORS_IN_DETAIL])
    if len(problems) > _ERRORS_IN_DETAIL:
        shown += f" (and {len(problems) - _ERRORS_IN_DETAIL} more)"
    return ValidationFailed(
        shown,
        extra={
            "errors": [
                {"loc": ["body", *loc], "msg": message, "type": "value_error"}
                for _, loc, message in problems[:_ERRORS_LISTED]
            ]
        },
    )


class FeaturesService:
    def __init__(
        self,
        store: FeatureStore,
        metrics: FeatureMetrics,
        *,
        max_batch_events: int,
        max_future_seconds: float,
        max_entities: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.max_batch_events = max_batch_events
        self.max_future_seconds = max_future_seconds
        self.max_entities = max_entities
        self.clock = clock

    def validate(self, events: Sequence[Any]) -> list[Transaction]:
        """Every event as a Transaction, or one ValidationFailed naming every bad field."""
        if not events:
            raise _refusal([("events", ["events"], "must hold at least one event")])
        if len(events) > self.max_batch_events:
            raise _refusal(
                [
                    (
                        "events",
                        ["events"],
                        f"at most {self.max_batch_events} events per request, not {len(events)}",
                    )
                ]
            )
        now = self.clock()
        problems: list[Issue] = []
        valid: list[Transaction] = []
        for i, item in enumerate(events):
            if not isinstance(item, dict):
                problems.append((f"events[{i}]", ["events", i], "must be an object"))
                continue
            try:
                tx = Transaction.from_dict(item)
            except InvalidTransaction as exc:
                problems += [
                    (f"events[{i}].{_shown(field)}", ["events", i, _shown(field)], message)
                    for field, message in exc.errors.items()
                ]
                continue
            # Too far ahead would move the account's head forward and prune real history
            # (aggregates.py); a clock or unit mistake, not a transaction.
            if tx.timestamp > now + self.max_future_seconds:
                problems.append(
                    (
                        f"events[{i}].timestamp",
                        ["events", i, "timestamp"],
                        f"is {tx.timestamp - now:.0f} s ahead of server time"
                        f" (at most {self.max_future_seconds:g} s)",
                    )
                )
            valid.append(tx)
        if problems:
            raise _refusal(problems)
        return valid

    async def ingest(self, tenant: str, events: Sequence[Any]) -> IngestCounts:
        """Count a batch in `tenant`'s accounts, all or nothing as to validity: one bad
        event refuses them all."""
        try:
            transactions = self.validate(events)
        except ValidationFailed:
            self.metrics.events["refused"].inc(len(events))
            raise
        try:
            counts = await self.store.ingest(tenant, transactions)
        except FeatureStoreError as exc:
            self.metrics.store_errors["ingest"].inc()
            log.warning("feature store failed", operation="ingest", error=str(exc))
            raise StoreUnavailable() from None
        self.metrics.events["accepted"].inc(counts.accepted)
        self.metrics.events["duplicate"].inc(counts.duplicates)
        self.metrics.events["stale"].inc(counts.stale)
        return counts

    async def batch_get(
        self, entities: Sequence[EntityId], at: float | None
    ) -> tuple[float, list[Answer]]:
        """(as_of, each (tenant, account)'s aggregates at `as_of`, in the order asked)."""
        if len(entities) > self.max_entities:
            raise _refusal(
                [
                    (
                        "entities",
                        ["entities"],
                        f"at most {self.max_entities} entities per request, not {len(entities)}",
                    )
                ]
            )
        # The rule ids are ingested under (narthex.transactions): an id outside it can
        # never be known, and echoing it back could break the JSON answer.
        # One check over every id at once (a thousand calls would cost more than the store).
        if not _printable("".join(itertools.chain.from_iterable(entities))):
            raise _refusal(
                [
                    (
                        f"entities[{i}].{field}",
                        ["entities", i, field],
                        "must not contain whitespace or control characters",
                    )
                    for i, entity in enumerate(entities)
                    for field, value in zip(("tenant", "account"), entity, strict=True)
                    if not _printable(value)
                ]
            )
        started = time.perf_counter()
        as_of = self.clock() if at is None else at
        try:
            states = await self.store.states(entities)
        except FeatureStoreError as exc:
            self.metrics.store_errors["batch_get"].inc()
            log.warning("feature store failed", operation="batch_get", error=str(exc))
            raise StoreUnavailable() from None
        answer = [
            Answer(tenant, account, False, dict(DEFAULTS), None)
            if state is None or state.last_timestamp is None
            else Answer(tenant, account, True, state.features(as_of), as_of - state.last_timestamp)
            for (tenant, account), state in zip(entities, states, strict=True)
        ]
        self.metrics.batch_get_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_get_entities.observe(len(entities))
        return as_of, answer
