"""The stream consumer on a real Redis: ack after commit, a dead consumer's work claimed,
trimming that never drops an unacknowledged entry."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from narthex.analytics.consumer import StreamConsumer
from narthex.analytics.events import usage_record
from narthex.analytics.metrics import ConsumerMetrics
from narthex.analytics.store import AnalyticsStore, UsageRecord, migrate
from narthex.common.events import DATA_FIELD
from tests.support.databases import sqlite_url
from tests.support.redis import RedisScratch, redis_scratch

HOUR = 3600
T0 = 1_800_000_000 // HOUR * HOUR
GROUP = "analytics"


@pytest.fixture
async def scratch() -> AsyncIterator[RedisScratch]:
    async with redis_scratch() as scratch:
        yield scratch


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[AnalyticsStore]:
    url = sqlite_url(tmp_path)
    await migrate(url)
    async with await AnalyticsStore.open(url) as store:
        yield store


def consumer(
    scratch: RedisScratch, store: AnalyticsStore, name: str, **options: float
) -> StreamConsumer[UsageRecord]:
    return StreamConsumer(
        scratch.client,
        f"{scratch.prefix}:usage",
        GROUP,
        decode=usage_record,
        apply=store.apply_usage,
        metrics=ConsumerMetrics(CollectorRegistry()),
        name=name,
        batch=50,
        block_ms=10,
        **options,
    )


async def produce(scratch: RedisScratch, count: int, tenant: str = "t1") -> list[str]:
    ids = []
    for i in range(count):
        event_id = uuid.uuid4().hex
        event = {"id": event_id, "t": T0 + i, "tenant": tenant, "status": 200, "ms": 1.0}
        await scratch.client.xadd(
            f"{scratch.prefix}:usage", {DATA_FIELD: orjson.dumps({**event, "items": 1})}
        )
        ids.append(event_id)
    return ids


async def stream_ids(scratch: RedisScratch) -> list[str]:
    entries: Any = await scratch.client.xrange(f"{scratch.prefix}:usage")
    return [orjson.loads(fields[b"d"])["id"] for _, fields in entries]


async def requests(store: AnalyticsStore, tenant: str = "t1") -> int:
    return sum(r["requests"] for r in await store.usage_rows(tenant, T0, T0 + HOUR))


async def test_a_dead_consumers_pending_events_are_claimed_and_counted_once(
    scratch: RedisScratch, sqlite_store: AnalyticsStore
) -> None:
    await produce(scratch, 120)
    dead = consumer(scratch, sqlite_store, "dead")
    await dead.ensure_group()
    # It read 50 and died before acknowledging them (they were applied or not: either way).
    taken = await dead._read(">", block=False)
    await sqlite_store.apply_usage([usage_record(orjson.loads(f[b"d"])) for _, f in taken[:20]])

    alive = consumer(scratch, sqlite_store, "alive", claim_idle_seconds=0.0)
    claimed = await alive.claim()
    while entries := await alive._read(">", block=False):
        await alive.handle(entries)

    assert claimed == 50
    assert await requests(sqlite_store) == 120
    pending = await scratch.client.xpending(f"{scratch.prefix}:usage", GROUP)
    assert pending["pending"] == 0
    assert await alive.update_lag() == 0


async def test_trimming_keeps_every_unacknowledged_entry(
    scratch: RedisScratch, sqlite_store: AnalyticsStore
) -> None:
    ids = await produce(scratch, 300)
    first = consumer(scratch, sqlite_store, "first")
    await first.ensure_group()
    await first.handle(await first._read(">", block=False))  # 50 acknowledged
    await first._read(">", block=False)  # 50 delivered, pending
    # 200 not delivered yet

    await first.trim()

    left = await stream_ids(scratch)
    assert left == ids[50:]  # the acknowledged ones gone; pending and undelivered all kept

    # Once all are acknowledged, a trim can remove all but the last delivered.
    second = consumer(scratch, sqlite_store, "second", claim_idle_seconds=0.0)
    await second.claim()
    while entries := await second._read(">", block=False):
        await second.handle(entries)
    await second.trim()
    assert await requests(sqlite_store) == 300
    left = await stream_ids(scratch)
    assert left == ids[-1:]  # the last delivered entry marks the group's position


async def test_an_invalid_entry_is_acknowledged_and_not_counted(
    scratch: RedisScratch, sqlite_store: AnalyticsStore
) -> None:
    stream = f"{scratch.prefix}:usage"
    await scratch.client.xadd(stream, {DATA_FIELD: b"not json"})
    await scratch.client.xadd(stream, {DATA_FIELD: orjson.dumps({"id": "x", "t": T0})})
    await produce(scratch, 1)
    one = consumer(scratch, sqlite_store, "one")
    await one.ensure_group()

    applied = await one.handle(await one._read(">", block=False))

    assert applied.applied == 1
    assert (await scratch.client.xpending(stream, GROUP))["pending"] == 0


async def test_two_replicas_split_the_stream_and_count_it_once(
    scratch: RedisScratch, sqlite_store: AnalyticsStore
) -> None:
    await produce(scratch, 120)
    first = consumer(scratch, sqlite_store, "first")
    second = consumer(scratch, sqlite_store, "second")
    await first.ensure_group()
    await second.ensure_group()  # the group exists: a second replica joins it

    taken = {"first": 0, "second": 0}
    for name, one in (("first", first), ("second", second), ("first", first)):
        entries = await one._read(">", block=False)
        taken[name] += len(entries)
        await one.handle(entries)

    assert taken == {"first": 70, "second": 50}  # batches of 50: 50, 50, then the last 20
    assert await requests(sqlite_store) == 120
