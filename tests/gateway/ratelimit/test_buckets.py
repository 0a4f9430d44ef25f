"""The limiter contract (token bucket, cost, daily quota, peek): memory, Redis, Redis Cluster.

Every backend runs on a clock the test drives (the Redis script takes it as an argument),
so refill and midnight are exact and nothing waits for real time; one Redis test checks
that without a clock the script reads the server's own time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from redis.asyncio import Redis

from narthex.gateway.ratelimit.buckets import (
    Commands,
    Decision,
    Limiter,
    Limits,
    MemoryLimiter,
    RedisLimiter,
)
from narthex.gateway.resp import PipelinedRedis
from narthex.testing.clock import ManualClock
from tests.support.redis import REDIS_URL, RedisScratch, redis_scratch
from tests.support.redis_cluster import (
    LocalCluster,
    cluster_scratch,
    redis_cluster_fixture,  # noqa: F401 - the `redis_cluster` fixture
)

# So slow that no token comes back during a test: the bucket only drains.
NO_REFILL = 1e-6
# A fixed instant (2026-03-01 12:00:00 UTC) that every backend's clock starts at.
NOON = dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC).timestamp()


@dataclass
class Backend:
    """A limiter and the clock it reads: time passes when the test moves it."""

    limiter: Limiter
    clock: ManualClock

    def now(self) -> float:
        return self.clock.now

    async def wait(self, seconds: float) -> None:
        self.clock.advance(seconds)


@pytest.fixture(params=["memory", "redis-py", "pipelined", "cluster"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    clock = ManualClock(NOON)
    if request.param == "memory":
        yield Backend(MemoryLimiter(clock=clock), clock)
        return
    if request.param == "cluster":
        # redis-py's cluster client routes the script by its keys' hash tag.
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        async with cluster_scratch(cluster) as on_cluster:
            yield Backend(
                RedisLimiter(on_cluster.client, prefix=on_cluster.prefix, clock=clock), clock
            )
        return
    async with redis_scratch() as scratch, commands_for(request.param, scratch) as commands:
        yield Backend(RedisLimiter(commands, prefix=scratch.prefix, clock=clock), clock)


@asynccontextmanager
async def commands_for(client: str, scratch: RedisScratch) -> AsyncIterator[Commands]:
    """The scratch's redis-py client, or the gateway's pipelined client to the same server."""
    if client == "redis-py":
        yield scratch.client
        return
    pipelined = PipelinedRedis.from_url(REDIS_URL, timeout=3.0, connect_timeout=3.0)
    try:
        yield pipelined
    finally:
        await pipelined.aclose()


@pytest.fixture
async def scratch() -> AsyncIterator[RedisScratch]:
    async with redis_scratch() as scratch:
        yield scratch


@pytest.fixture(params=["redis-py", "pipelined"])
async def commands(
    request: pytest.FixtureRequest, scratch: RedisScratch
) -> AsyncIterator[Commands]:
    async with commands_for(request.param, scratch) as commands:
        yield commands


async def drain(limiter: Limiter, tenant: str, limits: Limits) -> tuple[int, Decision]:
    """Cost-1 requests back to back until one is refused: how many passed, and the refusal."""
    admitted = 0
    while (decision := await limiter.acquire(tenant, limits, 1)).allowed:
        admitted += 1
        assert admitted <= limits.burst + 100, "the bucket never ran dry"
    return admitted, decision


def seconds_to_midnight(now: float) -> float:
    moment = dt.datetime.fromtimestamp(now, dt.UTC)
    midnight = dt.datetime.combine(moment.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
    return midnight.timestamp() - now


async def test_a_new_tenant_starts_with_a_full_bucket(backend: Backend) -> None:
    limits = Limits(rate=20, burst=5, daily_quota=1000)
    admitted, refusal = await drain(backend.limiter, "t_new", limits)

    assert admitted == 5
    assert not refusal.allowed
    assert refusal.reason == "rate"
    assert refusal.retry_after == pytest.approx(1 / 20, abs=1e-9)
    assert refusal.quota_used == 5
    # Waiting the advertised time is enough for the same request (plus a microsecond: a
    # double holding today's Unix time resolves about a quarter of one).
    await backend.wait(refusal.retry_after + 1e-6)
    assert (await backend.limiter.acquire("t_new", limits, 1)).allowed


async def test_refill_admits_rate_times_elapsed(backend: Backend) -> None:
    limits = Limits(rate=20, burst=20, daily_quota=1000)
    await drain(backend.limiter, "t_refill", limits)

    for seconds, expected in ((0.5, 10), (0.25, 5)):
        await backend.wait(seconds)
        admitted, refusal = await drain(backend.limiter, "t_refill", limits)
        assert admitted == expected, (seconds, admitted)
        assert refusal.reason == "rate"


async def test_a_request_costs_its_items_and_one_over_the_burst_is_too_large(
    backend: Backend,
) -> None:
    limits = Limits(rate=NO_REFILL, burst=10, daily_quota=100)
    five = await backend.limiter.acquire("t_cost", limits, 5)
    assert five.allowed
    assert five.reason == "ok"
    assert five.retry_after == 0
    assert five.remaining == pytest.approx(5, abs=1e-3)
    assert (five.quota_used, five.quota_remaining) == (5, 95)

    too_large = await backend.limiter.acquire("t_cost", limits, 11)
    assert not too_large.allowed
    assert too_large.reason == "too_large"
    assert too_large.retry_after == 0
    assert too_large.remaining == pytest.approx(5, abs=1e-3)
    assert too_large.quota_used == 5

    after = await backend.limiter.peek("t_cost", limits)
    assert after.remaining == pytest.approx(5, abs=1e-3)
    assert after.quota_used == 5
    # Exactly what is left still passes; one more does not, and costs nothing.
    assert (await backend.limiter.acquire("t_cost", limits, 5)).allowed
    refused = await backend.limiter.acquire("t_cost", limits, 1)
    assert refused.reason == "rate"
    assert refused.quota_used == 10


async def test_a_cost_equal_to_the_burst_passes_on_a_full_bucket(backend: Backend) -> None:
    limits = Limits(rate=NO_REFILL, burst=10, daily_quota=100)
    decision = await backend.limiter.acquire("t_whole", limits, 10)
    assert decision.allowed
    assert decision.remaining == pytest.approx(0, abs=1e-3)


async def test_the_daily_quota_stops_the_tenant_at_exactly_its_limit(backend: Backend) -> None:
    limits = Limits(rate=NO_REFILL, burst=100, daily_quota=7)
    for _ in range(7):
        assert (await backend.limiter.acquire("t_quota", limits, 1)).allowed

    expected_reset = seconds_to_midnight(backend.now())
    refusal = await backend.limiter.acquire("t_quota", limits, 1)
    assert not refusal.allowed
    assert refusal.reason == "quota"
    assert (refusal.quota_limit, refusal.quota_used, refusal.quota_remaining) == (7, 7, 0)
    assert refusal.retry_after == refusal.quota_reset_seconds
    assert refusal.quota_reset_seconds == pytest.approx(expected_reset, abs=1e-6)
    assert 0 < refusal.quota_reset_seconds <= 86400
    # The quota refusal took no tokens from the bucket.
    assert refusal.remaining == pytest.approx(93, abs=1e-3)
    assert (await backend.limiter.peek("t_quota", limits)).remaining == pytest.approx(93, abs=1e-3)


async def test_a_cost_that_would_overrun_the_quota_is_refused_whole(backend: Backend) -> None:
    limits = Limits(rate=NO_REFILL, burst=100, daily_quota=7)
    assert (await backend.limiter.acquire("t_fit", limits, 5)).allowed
    over = await backend.limiter.acquire("t_fit", limits, 3)
    assert over.reason == "quota"
    assert over.quota_used == 5
    assert over.remaining == pytest.approx(95, abs=1e-3)
    fits = await backend.limiter.acquire("t_fit", limits, 2)
    assert fits.allowed
    assert (fits.quota_used, fits.quota_remaining) == (7, 0)


async def test_a_rate_refusal_consumes_no_quota(backend: Backend) -> None:
    limits = Limits(rate=NO_REFILL, burst=3, daily_quota=100)
    admitted, refusal = await drain(backend.limiter, "t_rate", limits)
    assert admitted == 3
    assert refusal.reason == "rate"
    assert refusal.quota_used == 3
    assert (await backend.limiter.acquire("t_rate", limits, 2)).quota_used == 3
    assert (await backend.limiter.peek("t_rate", limits)).quota_used == 3


async def test_peek_consumes_nothing_and_agrees_with_acquire(backend: Backend) -> None:
    limits = Limits(rate=0.001, burst=5, daily_quota=8)
    fresh = await backend.limiter.peek("t_peek", limits)
    assert fresh.allowed
    assert fresh.reason == "ok"
    assert (fresh.capacity, fresh.remaining, fresh.seconds_until_full) == (5, 5, 0)
    assert fresh.refill_rate == 0.001
    assert (fresh.quota_limit, fresh.quota_used, fresh.quota_remaining) == (8, 0, 8)
    assert fresh.quota_reset_seconds == pytest.approx(seconds_to_midnight(backend.now()), abs=1e-6)
    assert fresh.retry_after == 0
    for _ in range(10):
        await backend.limiter.peek("t_peek", limits)

    decisions = [await backend.limiter.acquire("t_peek", limits, 1) for _ in range(3)]
    view = await backend.limiter.peek("t_peek", limits)
    assert view.allowed
    assert view.remaining == pytest.approx(decisions[-1].remaining, abs=1e-3)
    assert view.remaining == pytest.approx(2, abs=1e-3)
    assert view.seconds_until_full == pytest.approx(3 / 0.001, rel=1e-3)
    assert (view.quota_used, view.quota_remaining) == (3, 5)

    admitted, _ = await drain(backend.limiter, "t_peek", limits)
    assert admitted == 2
    empty = await backend.limiter.peek("t_peek", limits)
    assert not empty.allowed
    assert empty.reason == "rate"
    assert empty.retry_after == pytest.approx(1 / 0.001, rel=1e-3)
    assert empty.quota_used == 5


async def test_peek_reports_a_spent_quota(backend: Backend) -> None:
    limits = Limits(rate=NO_REFILL, burst=10, daily_quota=4)
    assert (await backend.limiter.acquire("t_spent", limits, 4)).allowed
    view = await backend.limiter.peek("t_spent", limits)
    assert not view.allowed
    assert view.reason == "quota"
    assert view.retry_after == view.quota_reset_seconds
    assert view.remaining == pytest.approx(6, abs=1e-3)


async def test_tenants_are_independent(backend: Backend) -> None:
    limits = Limits(rate=NO_REFILL, burst=3, daily_quota=4)
    admitted, refusal = await drain(backend.limiter, "t_a", limits)
    assert (admitted, refusal.reason) == (3, "rate")

    other = await backend.limiter.peek("t_b", limits)
    assert (other.remaining, other.quota_used) == (3, 0)
    admitted, refusal = await drain(backend.limiter, "t_b", limits)
    assert (admitted, refusal.reason) == (3, "rate")
    assert (await backend.limiter.peek("t_a", limits)).quota_used == 3


async def test_concurrent_acquires_admit_exactly_the_burst(backend: Backend) -> None:
    limits = Limits(rate=NO_REFILL, burst=50, daily_quota=1000)
    decisions = await asyncio.gather(
        *(backend.limiter.acquire("t_crowd", limits, 1) for _ in range(200))
    )
    assert sum(d.allowed for d in decisions) == 50
    assert {d.reason for d in decisions if not d.allowed} == {"rate"}
    assert (await backend.limiter.peek("t_crowd", limits)).quota_used == 50


async def test_concurrent_acquires_admit_exactly_the_quota(backend: Backend) -> None:
    limits = Limits(rate=NO_REFILL, burst=50, daily_quota=30)
    decisions = await asyncio.gather(
        *(backend.limiter.acquire("t_crowd", limits, 1) for _ in range(200))
    )
    assert sum(d.allowed for d in decisions) == 30
    assert {d.reason for d in decisions if not d.allowed} == {"quota"}
    view = await backend.limiter.peek("t_crowd", limits)
    assert view.remaining == pytest.approx(20, abs=1e-3)


async def test_a_cost_below_one_is_a_programming_error(backend: Backend) -> None:
    with pytest.raises(ValueError, match="cost"):
        await backend.limiter.acquire("t_zero", Limits(rate=1, burst=1, daily_quota=1), 0)


@pytest.mark.parametrize(
    ("rate", "burst", "quota"),
    [(0, 1, 1), (-1, 1, 1), (float("inf"), 1, 1), (float("nan"), 1, 1), (1, 0, 1), (1, 1, -1)],
)
def test_nonsense_limits_are_refused(rate: float, burst: int, quota: int) -> None:
    with pytest.raises(ValueError, match="must"):
        Limits(rate=rate, burst=burst, daily_quota=quota)


async def test_the_quota_resets_at_utc_midnight(backend: Backend) -> None:
    backend.clock.now = dt.datetime(2026, 3, 2, tzinfo=dt.UTC).timestamp() - 0.5
    limits = Limits(rate=100, burst=10, daily_quota=2)
    assert (await backend.limiter.acquire("t_day", limits, 2)).allowed
    refusal = await backend.limiter.acquire("t_day", limits, 1)
    assert refusal.reason == "quota"
    assert refusal.retry_after == pytest.approx(0.5)

    await backend.wait(refusal.retry_after)
    fresh = await backend.limiter.acquire("t_day", limits, 1)
    assert fresh.allowed
    assert (fresh.quota_used, fresh.quota_reset_seconds) == (1, 86400)


async def test_a_clock_stepped_back_does_not_drain_the_bucket(backend: Backend) -> None:
    limits = Limits(rate=1, burst=5, daily_quota=100)
    assert (await backend.limiter.acquire("t_step", limits, 2)).remaining == 3
    await backend.wait(-30)
    assert (await backend.limiter.peek("t_step", limits)).remaining == 3


# Redis backend only.


class CountingRedis:
    """Passes every command to `inner`, recording its name."""

    def __init__(self, inner: Commands) -> None:
        self.inner = inner
        self.commands: list[str] = []

    async def execute_command(self, *args: Any) -> Any:
        self.commands.append(str(args[0]).upper())
        return await self.inner.execute_command(*args)


async def test_redis_a_decision_is_one_evalsha(scratch: RedisScratch, commands: Commands) -> None:
    client = CountingRedis(commands)
    limiter = RedisLimiter(client, prefix=scratch.prefix)
    limits = Limits(rate=20, burst=5, daily_quota=100)
    await limiter.peek("t_trip", limits)  # the script may not be loaded yet
    client.commands.clear()

    for cost in (1, 2, 3, 9):  # allowed, allowed, rate, too_large
        await limiter.acquire("t_trip", limits, cost)
    await limiter.peek("t_trip", limits)
    assert client.commands == ["EVALSHA"] * 5


async def test_redis_survives_a_script_flush(scratch: RedisScratch, commands: Commands) -> None:
    client = CountingRedis(commands)
    limiter = RedisLimiter(client, prefix=scratch.prefix)
    limits = Limits(rate=NO_REFILL, burst=5, daily_quota=100)
    assert (await limiter.acquire("t_flush", limits, 1)).allowed

    await scratch.client.script_flush()
    client.commands.clear()
    after = await limiter.acquire("t_flush", limits, 1)
    assert after.allowed
    assert after.quota_used == 2
    assert client.commands == ["EVALSHA", "EVAL"]


async def test_redis_keys_expire_and_a_peek_writes_nothing(scratch: RedisScratch) -> None:
    client = scratch.client
    limiter = RedisLimiter(client, prefix=scratch.prefix, clock=ManualClock(NOON))
    limits = Limits(rate=0.02, burst=5, daily_quota=100)
    await limiter.peek("t_ttl", limits)
    assert [k async for k in client.scan_iter(match=f"{scratch.prefix}:*")] == []

    before = time.monotonic()
    await limiter.acquire("t_ttl", limits, 2)
    keys = sorted([k.decode() async for k in client.scan_iter(match=f"{scratch.prefix}:*")])
    bucket, quota = keys
    assert bucket == f"{scratch.prefix}:{{t_ttl}}:bucket"
    # The counter is named by the UTC day of the limiter's clock.
    assert quota == f"{scratch.prefix}:{{t_ttl}}:quota:2026-03-01"
    bucket_ms, quota_ms = await client.pttl(bucket), await client.pttl(quota)
    # TTLs run in real time from the script's EXPIRE: at most this long has passed since.
    spent_ms = (time.monotonic() - before) * 1000 + 1

    # The bucket lives until it would be full again (2 tokens at 0.02/s = 100 s) plus 1 s.
    assert 0 <= 101_000 - bucket_ms <= spent_ms
    # The day's counter lives until an hour after the UTC day ends (12 h after noon).
    assert 0 <= (12 + 1) * 3_600_000 - quota_ms <= spent_ms


async def test_redis_without_a_clock_reads_the_servers_time(scratch: RedisScratch) -> None:
    client = scratch.client
    limiter = RedisLimiter(client, prefix=scratch.prefix)
    limits = Limits(rate=NO_REFILL, burst=5, daily_quota=100)
    seconds, micros = await client.time()
    before = seconds + micros / 1e6
    decision = await limiter.acquire("t_server", limits, 1)
    seconds, micros = await client.time()
    after = seconds + micros / 1e6

    # A day boundary between the two readings would make the dates differ; both are allowed.
    days = {dt.datetime.fromtimestamp(t, dt.UTC).date().isoformat() for t in (before, after)}
    (key,) = [k.decode() async for k in client.scan_iter(match=f"{scratch.prefix}:*:quota:*")]
    assert key.rsplit(":", 1)[1] in days
    if len(days) == 1:
        resets = (seconds_to_midnight(after), seconds_to_midnight(before))
        assert resets[0] - 1e-6 <= decision.quota_reset_seconds <= resets[1] + 1e-6


async def test_redis_works_with_a_decoding_client(scratch: RedisScratch) -> None:
    client = Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        limiter = RedisLimiter(client, prefix=scratch.prefix)
        limits = Limits(rate=NO_REFILL, burst=2, daily_quota=100)
        assert (await limiter.acquire("t_text", limits, 2)).remaining == pytest.approx(0, abs=1e-3)
        assert (await limiter.acquire("t_text", limits, 1)).reason == "rate"
    finally:
        await client.aclose()
