"""The aggregates store: each event counted once, whatever is delivered twice, on both databases."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from narthex.analytics.events import score_record, usage_record
from narthex.analytics.service import usage_range, usage_report
from narthex.analytics.store import AnalyticsStore

HOUR = 3600
T0 = 1_800_000_000 // HOUR * HOUR  # an hour's start


def usage(tenant: str = "t1", **fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "t": T0 + 10,
        "tenant": tenant,
        "key": "k1",
        "route": "/v1/models",
        "model": "fraud",
        "version": "1",
        "items": 2,
        "status": 200,
        "ms": 3.0,
        "limited": False,
    }
    event.update(fields)
    return event


async def test_a_batch_applied_twice_counts_once(store: AnalyticsStore) -> None:
    events = [usage(), usage(status=429, items=0, limited=True), usage(status=502, ms=40.0)]
    records = [usage_record(e) for e in events]

    first = await store.apply_usage(records)
    again = await store.apply_usage(records)
    # A duplicate inside one batch (a producer's retried write) counts once too.
    doubled = await store.apply_usage([usage_record(events[0]), usage_record(events[0])])

    assert (first.applied, first.duplicates) == (3, 0)
    assert (again.applied, again.duplicates) == (0, 3)
    assert (doubled.applied, doubled.duplicates) == (0, 2)
    rows = await store.usage_rows("t1", T0, T0 + HOUR)
    assert sum(r["requests"] for r in rows) == 3
    assert sum(r["items"] for r in rows) == 4
    assert sum(r["limited"] for r in rows) == 1


async def test_concurrent_writers_of_the_same_events_count_each_once(store: AnalyticsStore) -> None:
    """Two replicas applying overlapping batches at once (a claimed batch the first one was
    still committing): the rows add up to each event once."""
    events = [usage_record(usage(t=T0 + i)) for i in range(200)]

    results = await asyncio.gather(store.apply_usage(events[:150]), store.apply_usage(events[50:]))

    assert sum(r.applied for r in results) == 200
    rows = await store.usage_rows("t1", T0, T0 + HOUR)
    assert sum(r["requests"] for r in rows) == 200


async def test_a_tenant_sees_only_its_own_rows(store: AnalyticsStore) -> None:
    await store.apply_usage([usage_record(usage("t1")), usage_record(usage("t2", items=7))])

    period = usage_range(None, None, "hour", now=T0 + HOUR - 1, max_days=400)
    report = usage_report(await store.usage_rows("t2", period.start, period.end), period, "t2")

    assert report["totals"]["requests"] == 1
    assert report["totals"]["items"] == 7
    assert [k["key_id"] for k in report["by_key"]] == ["k1"]


async def test_latency_quantiles_are_exact_to_the_bucket(store: AnalyticsStore) -> None:
    # 90 fast (<= 5 ms), 9 at 80 ms (<= 100), 1 at 4 s (<= 5000)
    events = [usage(ms=4.0) for _ in range(90)] + [usage(ms=80.0) for _ in range(9)]
    events.append(usage(ms=4000.0))
    await store.apply_usage([usage_record(e) for e in events])

    period = usage_range(None, None, "day", now=T0 + 60, max_days=400)
    report = usage_report(await store.usage_rows("t1", period.start, period.end), period, "t1")

    latency = report["totals"]["latency_ms"]
    assert (latency["p50"], latency["p95"], latency["p99"]) == (5, 100, 100)
    assert sum(b["count"] for b in latency["buckets"]) == 100


async def test_score_counts_add_up_once(store: AnalyticsStore) -> None:
    event = {
        "id": uuid.uuid4().hex,
        "t": T0,
        "model": "fraud",
        "version": "2",
        "tenant": "t1",
        "counts": [5, 1, 0, 0, 0, 0, 0, 0, 0, 4],
    }
    other = {**event, "id": uuid.uuid4().hex, "tenant": "t2"}

    await store.apply_scores([score_record(event), score_record(other)])
    await store.apply_scores([score_record(event)])

    counts = await store.score_counts(T0)
    assert counts == {("fraud", "2"): [10, 2, 0, 0, 0, 0, 0, 0, 0, 8]}


@pytest.mark.parametrize(
    "field",
    [
        {"t": 1e300},
        {"t": -1},
        {"items": 2**63},
        {"items": -1},
        {"status": 99},
        {"ms": float("inf")},
        {"tenant": ""},
        {"id": "x" * 65},
        {"items": True},
    ],
)
def test_an_event_out_of_bounds_is_invalid_not_a_failing_transaction(
    field: dict[str, Any],
) -> None:
    (name,) = field
    with pytest.raises(ValueError, match=f"^{name}$"):  # the error names the field
        usage_record(usage(**field))
