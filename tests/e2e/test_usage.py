"""Usage analytics end to end: real auth, gateway, analytics and redis-server processes.

- Nothing lost, nothing doubled: 5,000 requests of mixed outcomes (200, 400, 403, 429)
  through the gateway while the analytics process is SIGKILLed twice (and restarted) and
  Redis is restarted once: `/v1/admin/usage` then equals, exactly, what the gateway
  answered, per status and in items charged. Once with one analytics replica (SQLite),
  once with two sharing the work (PostgreSQL, a database of the test's own).
- Producers under an outage: Redis stopped for 10 s under load: no 5xx from the gateway,
  and every request is either counted by analytics or counted as dropped by the gateway.
- Reading usage is not usage: `/v1/usage` answers the caller's own tenant, charges nothing,
  and refuses a bad range with a problem.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support.analytics import (
    PLAN,
    AnalyticsProcess,
    metric_sum,
    mixed_load,
    usage_stack,
    wait_for_usage,
)
from tests.support.platform import Ledger, PrivateRedis

# Real processes on a small shared machine: minutes, not the default two.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

TOTAL = 5_000
PROBLEM_JSON = "application/problem+json"


def restart(process: AnalyticsProcess) -> None:
    process.kill()
    process.start()


def restart_redis(redis: PrivateRedis) -> None:
    redis.stop()  # SIGTERM: the append-only file is complete
    redis.start()


@pytest.mark.parametrize("replicas", [1, 2], ids=["one-replica", "two-replicas"])
def test_usage_equals_what_the_gateway_answered_across_kills_and_a_redis_restart(
    tmp_path: Path, replicas: int
) -> None:
    before_kill: list[float] = []
    # One restart at a time: with one replica, the second kill waits for the first restart.
    one_at_a_time = threading.Lock()

    def restart_first() -> None:
        with one_at_a_time:
            restart(s.analytics[0])

    def count_and_restart(process: AnalyticsProcess) -> None:
        with one_at_a_time:
            before_kill.append(metric_sum(process.url, "analytics_events_applied_total"))
            restart(process)

    with usage_stack(tmp_path, replicas) as s:
        last = s.analytics[-1]
        result = asyncio.run(
            mixed_load(
                s.gateway.url,
                s.tenant.headers,
                TOTAL,
                at={
                    1_000: restart_first,
                    2_500: lambda: restart_redis(s.redis),
                    3_500: lambda: count_and_restart(last),
                },
            )
        )
        totals = wait_for_usage(s.gateway.url, s.edge.admin_key, s.tenant.id, result.sent)
        dropped = metric_sum(s.gateway.url, "events_dropped_total")
        applied_by_first = metric_sum(s.analytics[0].url, "analytics_events_applied_total")

    assert not result.errors
    assert result.sent == TOTAL
    assert {429, 400, 403, 200} <= set(result.statuses), result.statuses
    assert dropped == 0
    assert totals["statuses"] == {str(s): n for s, n in sorted(result.statuses.items())}
    assert totals["items"] == result.items
    assert totals["requests"] == TOTAL
    # Which replica applied what depends on when each came back (how replicas split the
    # work is tests/services/analytics/test_consumer.py's); the count of all is exact.
    assert applied_by_first + before_kill[0] > 0


def test_a_redis_outage_under_load_costs_no_5xx_and_every_event_is_counted(
    tmp_path: Path,
) -> None:
    """A small buffer, so that the 10 s outage overflows it: what did not fit is counted as
    dropped, the rest is delivered from the buffer once Redis is back."""
    stop = threading.Event()

    def outage() -> None:
        s.redis.stop()
        time.sleep(10.0)  # the outage's length, not a wait for something
        s.redis.start()
        time.sleep(2.0)  # and some load after it
        stop.set()

    with usage_stack(tmp_path, events_buffer="200") as s:
        # The operator's own calls (creating the tenant) are usage events too.
        before = int(metric_sum(s.gateway.url, "events_enqueued_total"))
        result = asyncio.run(
            mixed_load(
                s.gateway.url, s.tenant.headers, 10**9, clients=4, at={300: outage}, stop=stop
            )
        )
        deadline = time.monotonic() + 30
        while metric_sum(s.gateway.url, "events_buffered") and time.monotonic() < deadline:
            time.sleep(0.2)
        # Every emit is enqueued or refused (`full`); an enqueued one is written or lost
        # later (`evicted`, `shutdown`). One tenant alone never evicts: it is always the
        # biggest holder, so its own event is the one refused.
        refused = int(metric_sum(s.gateway.url, "events_dropped_total", reason="full"))
        dropped = int(metric_sum(s.gateway.url, "events_dropped_total"))
        enqueued = int(metric_sum(s.gateway.url, "events_enqueued_total"))
        totals = wait_for_usage(s.gateway.url, s.edge.admin_key, s.tenant.id, result.sent - dropped)

    assert not result.errors
    assert not [status for status in result.statuses if status >= 500], result.statuses
    assert refused > 0
    assert dropped == refused
    assert enqueued - before + refused == result.sent
    assert totals["requests"] + dropped == result.sent


def test_reading_usage_is_scoped_to_the_caller_and_charges_nothing(tmp_path: Path) -> None:
    with usage_stack(tmp_path) as s:
        other = s.admin.create_tenant("other", s.admin.create_plan("other", PLAN))
        client = httpx.Client(base_url=s.gateway.url, headers=s.tenant.headers, timeout=10)
        with client:
            ledger = Ledger(client)
            asyncio.run(mixed_load(s.gateway.url, other.headers, 30, clients=2))
            asyncio.run(mixed_load(s.gateway.url, s.tenant.headers, 10, clients=1))
            wait_for_usage(s.gateway.url, s.edge.admin_key, s.tenant.id, 10)

            own = client.get("/v1/usage", params={"granularity": "hour", "tenant": other.id})
            bad = client.get("/v1/usage", params={"from": "2026-01-02", "to": "2026-01-01"})
            garbage = client.get("/v1/usage", params={"from": "yesterday"})
            wide = client.get("/v1/usage", params={"from": "2020-01-01", "to": "2026-01-01"})
            not_admin = client.get("/v1/admin/usage", params={"tenant": other.id})
            remaining = ledger.quota()

    assert own.status_code == 200, own.text
    assert "ratelimit" not in own.headers  # not a limited route
    report = own.json()
    assert report["tenant"] == s.tenant.id  # its own, whatever it asks for
    assert report["totals"]["requests"] == 10
    assert len(report["series"]) == 25  # the last 24 h, hour by hour, the current one too
    # Split by the key that spent it (nx_<env>_<id>_<secret>), route and model.
    assert [k["key_id"] for k in report["by_key"]] == [s.tenant.key.split("_")[2]]
    routes = {r["route"]: r["requests"] for r in report["by_route"]}
    assert routes == {"/v1/models": 9, "/v1/admin/tenants": 1}  # mixed_load's 9th is a 403
    assert [(m["model"], m["version"]) for m in report["by_model"]] == [("x", None)]
    assert remaining == ledger.remaining - report["totals"]["items"]
    for refused in (bad, wide):
        assert refused.status_code == 400
        assert refused.headers["content-type"] == PROBLEM_JSON
        assert refused.json()["type"].endswith("/bad-range")
    assert garbage.status_code == 422
    assert garbage.headers["content-type"] == PROBLEM_JSON
    assert not_admin.status_code == 403
