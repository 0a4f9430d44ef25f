"""AnalyticsStore: the aggregates database, updated once per event id, and migrate().

A batch of events is applied in one transaction: its ids go into `processed_events` (those
already there are skipped), and only the new ones are added to the hourly rows. The consumer
acknowledges the batch after that commit, so a crash anywhere before it re-delivers events
that either were not counted (the transaction rolled back) or are recognised by id.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Table, and_, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from narthex.analytics.models import (
    LATENCY_COLUMNS,
    SCORE_COLUMNS,
    SCORE_KEYS,
    USAGE_KEYS,
    processed_events,
    score_hourly,
    usage_hourly,
)
from narthex.common import database
from narthex.common.database import Database

MIGRATIONS = Path(__file__).with_name("migrations")
_MIGRATION_LOCK = 0x6E61727468657804
# SQLite: how long a writer waits for another replica's transaction before giving up.


@dataclass(frozen=True, slots=True)
class Applied:
    applied: int
    duplicates: int


UsageKey = tuple[str, int, str, str, str, str, int]
ScoreKey = tuple[str, str, str, int]


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One usage event, validated (see narthex.analytics.events)."""

    id: str
    hour: int
    tenant: str
    key_id: str
    route: str
    model: str
    version: str
    status: int
    items: int
    limited: bool
    latency_ms: float
    latency_bucket: int

    @property
    def key(self) -> UsageKey:
        return (
            self.tenant,
            self.hour,
            self.key_id,
            self.route,
            self.model,
            self.version,
            self.status,
        )


@dataclass(frozen=True, slots=True)
class ScoreRecord:
    """One prediction event: a batch's score counts for one tenant and model version."""

    id: str
    hour: int
    model: str
    version: str
    tenant: str
    counts: tuple[int, ...]

    @property
    def key(self) -> ScoreKey:
        return (self.model, self.version, self.tenant, self.hour)


class AnalyticsStore(Database):
    # Each transaction reads which event ids are new, then writes: take the lock up front.
    immediate = True

    # -- writes ---------------------------------------------------------------------------

    async def apply_usage(self, records: Sequence[UsageRecord]) -> Applied:
        async with self._engine.begin() as connection:
            fresh = await _claim_ids(connection, [r.id for r in records])
            rows: dict[UsageKey, dict[str, Any]] = {}
            for record in records:
                if record.id not in fresh:
                    continue
                fresh.discard(record.id)  # a duplicate inside the batch counts once too
                row = rows.get(record.key)
                if row is None:
                    row = dict(zip(USAGE_KEYS, record.key, strict=True))
                    row.update(requests=0, items=0, limited=0, latency_ms_sum=0.0)
                    row.update(dict.fromkeys(LATENCY_COLUMNS, 0))
                    rows[record.key] = row
                row["requests"] += 1
                row["items"] += record.items
                row["limited"] += int(record.limited)
                row["latency_ms_sum"] += record.latency_ms
                row[LATENCY_COLUMNS[record.latency_bucket]] += 1
            counters = ("requests", "items", "limited", "latency_ms_sum", *LATENCY_COLUMNS)
            await _add(connection, usage_hourly, USAGE_KEYS, counters, rows)
            applied = sum(row["requests"] for row in rows.values())
        return Applied(applied, len(records) - applied)

    async def apply_scores(self, records: Sequence[ScoreRecord]) -> Applied:
        async with self._engine.begin() as connection:
            fresh = await _claim_ids(connection, [r.id for r in records])
            rows: dict[ScoreKey, dict[str, Any]] = {}
            applied = 0
            for record in records:
                if record.id not in fresh:
                    continue
                fresh.discard(record.id)
                applied += 1
                row = rows.get(record.key)
                if row is None:
                    row = dict(zip(SCORE_KEYS, record.key, strict=True))
                    row["predictions"] = 0
                    row.update(dict.fromkeys(SCORE_COLUMNS, 0))
                    rows[record.key] = row
                row["predictions"] += sum(record.counts)
                for name, count in zip(SCORE_COLUMNS, record.counts, strict=True):
                    row[name] += count
            await _add(connection, score_hourly, SCORE_KEYS, ("predictions", *SCORE_COLUMNS), rows)
        return Applied(applied, len(records) - applied)

    async def forget_before(self, cutoff: float) -> int:
        """Drop remembered event ids applied before `cutoff` (epoch seconds)."""
        async with self._engine.begin() as connection:
            result = await connection.execute(
                delete(processed_events).where(processed_events.c.applied_at < int(cutoff))
            )
            return int(result.rowcount or 0)

    # -- reads ----------------------------------------------------------------------------

    async def usage_rows(self, tenant: str | None, start: int, end: int) -> list[dict[str, Any]]:
        """The hourly rows with `start <= hour < end` (all tenants for None)."""
        where = [usage_hourly.c.hour >= start, usage_hourly.c.hour < end]
        if tenant is not None:
            where.append(usage_hourly.c.tenant == tenant)
        statement = select(usage_hourly).where(and_(*where)).order_by(usage_hourly.c.hour)
        async with self._engine.connect() as connection:
            result = await connection.execute(statement)
            return [dict(row._mapping) for row in result]

    async def score_counts(
        self, since_hour: int, tenant: str | None = None
    ) -> dict[tuple[str, str], list[int]]:
        """Every model version's score bin counts over the hours from `since_hour`, of one
        tenant's predictions or (None) of all tenants together."""
        columns = [func.sum(score_hourly.c[name]) for name in SCORE_COLUMNS]
        where = [score_hourly.c.hour >= since_hour]
        if tenant is not None:
            where.append(score_hourly.c.tenant == tenant)
        statement = (
            select(score_hourly.c.model, score_hourly.c.version, *columns)
            .where(and_(*where))
            .group_by(score_hourly.c.model, score_hourly.c.version)
        )
        async with self._engine.connect() as connection:
            result = await connection.execute(statement)
            return {(row[0], row[1]): [int(v or 0) for v in row[2:]] for row in result}


async def _claim_ids(connection: AsyncConnection, ids: Iterable[str]) -> set[str]:
    """Insert the ids not seen before; return those (the events to count now)."""
    unique = list(dict.fromkeys(ids))
    if not unique:
        return set()
    now = int(time.time())
    insert = _insert(connection, processed_events)
    # Many rows through one cached statement (SQLAlchemy's insertmanyvalues batches them,
    # within each driver's parameter limits), not a statement compiled per batch size.
    statement = insert.on_conflict_do_nothing(index_elements=["id"]).returning(
        processed_events.c.id
    )
    result = await connection.execute(statement, [{"id": i, "applied_at": now} for i in unique])
    fresh: set[str] = set(result.scalars().all())
    return fresh


async def _add(
    connection: AsyncConnection,
    table: Table,
    keys: Sequence[str],
    counters: Sequence[str],
    rows: dict[Any, dict[str, Any]],
) -> None:
    """Add each row's counters to the stored row of its key (inserting it if new). Keys in
    sorted order: two replicas updating the same rows take their locks in the same order."""
    if not rows:
        return
    insert = _insert(connection, table)
    statement = insert.on_conflict_do_update(
        index_elements=list(keys),
        set_={name: table.c[name] + insert.excluded[name] for name in counters},
    )
    await connection.execute(statement, [rows[key] for key in sorted(rows)])


def _insert(connection: AsyncConnection, table: Table) -> Any:
    if connection.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


async def migrate(database_url: str) -> None:
    """`alembic upgrade head` on an async URL; a no-op when the schema is current."""
    await database.migrate(database_url, MIGRATIONS, lock_key=_MIGRATION_LOCK)
