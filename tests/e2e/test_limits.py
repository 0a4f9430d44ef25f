"""Rate limits end to end: real auth, gateway and Redis processes on loopback.

- Accuracy across replicas: 4 gateways share the test Redis (a private key prefix); 200
  clients of one tenant get what the plan allows and no more, while a second tenant's
  clients get their own full share.
- A plan change reaches every gateway within the plan cache time, without a restart.
- Redis outage: a private `redis-server` is killed mid-run; `open` gateways fall back to
  their per-replica memory bucket (no 5xx, no 401), `closed` ones answer 503 with
  Retry-After; after a restart on the same port the shared limiter is used again.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.platform import (
    ONE_ITEM,
    PREDICT,
    Admin,
    Edge,
    PlanNumbers,
    PrivateRedis,
    Tenant,
    accuracy_run,
    edge,
    format_run,
    private_redis,
    running,
)
from tests.support.redis import REDIS_URL, RedisScratch, redis_scratch
from tests.support.services import Service

pytestmark = pytest.mark.slow

REPLICAS = 4
# Small numbers, so that the bucket, not the machine, is what limits the clients.
ACCURACY_PLAN = PlanNumbers(rate=20.0, burst=40)
CLIENTS_A, CLIENTS_B = 200, 8
# As long as the issue asks for; with the gateways' start-up the test takes about 20 s.
ACCURACY_SECONDS = 10.0
PLAN_CACHE_SECONDS = 2.0
# How often a gateway whose Redis failed tries it again (EdgeLimiter's retry_seconds).
RETRY_SECONDS = 2.0
PROBLEM_JSON = "application/problem+json"


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limits_edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    """auth (SQLite) and the trivial upstream, shared by every test of the module."""
    with edge(tmp_path_factory.mktemp("limits")) as started:
        yield started


@dataclass
class Shared:
    """Gateways that share the real Redis under a private prefix."""

    gateways: list[Service]
    scratch: RedisScratch

    @property
    def urls(self) -> list[str]:
        return [g.url for g in self.gateways]


@pytest.fixture(scope="module")
def shared(limits_edge: Edge) -> Iterator[Shared]:
    """4 gateway replicas on the test Redis, a private prefix deleted after."""
    # One event loop for the scratch client's whole life: opened, used and closed in it.
    with asyncio.Runner() as runner, ExitStack() as stack:
        context = redis_scratch()
        scratch = runner.run(context.__aenter__())
        stack.callback(lambda: runner.run(context.__aexit__(None, None, None)))
        env = {
            "redis_url": REDIS_URL,
            "ratelimit_prefix": scratch.prefix,
            "replicas": str(REPLICAS),
            "plan_cache_seconds": str(PLAN_CACHE_SECONDS),
        }
        specs = [limits_edge.gateway(f"gateway-{i}", **env) for i in range(REPLICAS)]
        gateways = stack.enter_context(running(specs, limits_edge.directory))
        yield Shared(gateways, scratch)


@pytest.fixture(scope="module")
def admin(shared: Shared, limits_edge: Edge) -> Iterator[Admin]:
    client = Admin(shared.urls[0], limits_edge.admin_key)
    try:
        yield client
    finally:
        client.close()


# -- helpers ----------------------------------------------------------------------------------


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def metrics(client: httpx.AsyncClient) -> Samples:
    """Every sample of a gateway's /metrics, by (name, sorted labels)."""
    response = await client.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def decisions(sample: Samples, backend: str) -> float:
    return sum(
        value
        for (name, labels), value in sample.items()
        if name == "ratelimit_decisions_total" and ("backend", backend) in labels
    )


def decided(sample: Samples, backend: str, result: str) -> float:
    key = ("ratelimit_decisions_total", (("backend", backend), ("result", result)))
    return sample.get(key, 0.0)


def gauge(sample: Samples, name: str) -> float:
    return sample[(name, ())]


def quota(url: str, tenant: Tenant) -> dict[str, object]:
    response = httpx.get(url + "/v1/quota", headers=tenant.headers, timeout=5.0)
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


# -- accuracy across replicas -----------------------------------------------------------------


async def test_four_replicas_share_one_exact_bucket_and_tenants_are_isolated(
    shared: Shared, admin: Admin
) -> None:
    plan = admin.create_plan("accuracy", ACCURACY_PLAN)
    a, b = admin.create_tenant("tenant-a", plan), admin.create_tenant("tenant-b", plan)
    async with redis_scratch() as scratch:  # a client on this test's loop; same server
        run_a, run_b = await accuracy_run(
            shared.urls,
            scratch.client,
            shared.scratch.prefix,
            ACCURACY_PLAN,
            [(a, CLIENTS_A), (b, CLIENTS_B)],
            ACCURACY_SECONDS,
        )
    report = "\n".join(
        (format_run("A", run_a, ACCURACY_PLAN), format_run("B", run_b, ACCURACY_PLAN))
    )
    print(report)

    for run in (run_a, run_b):
        assert not run.errors, (run.errors[:5], report)
        assert run.server_errors == 0, report
        assert set(run.statuses) <= {200, 429}, report
        assert set(run.refusal_types) <= {"rate-limited"}, report
        # The limiter's window (Redis time: before the first request -> its last admission)
        # spans the clients' run: admissions went on to the end, nothing was cut short.
        assert run.elapsed > run.client_elapsed - 0.5, report
        assert run.elapsed <= run.client_elapsed + 0.5, report
        # Never more than the plan allows over that window (+1 request of slack); the
        # same over the clients' own window (first request sent -> last answer read).
        assert run.admitted <= run.allowed(ACCURACY_PLAN) + 1, report
        assert run.admitted <= run.allowed(ACCURACY_PLAN, run.client_elapsed) + 1, report
        assert run.first_admission >= run.window_start, report
        # A tenant the limiter refused asked for more than its plan: it got at least 95% of
        # what the plan allows from the first admission on (before it, a full bucket cannot
        # bank its refill). Not more: the clients' asks ride on the gateways' latency, so the
        # refill of the run's last moments can still be in the bucket when the clock stops -
        # under the full suite with one core kept busy, B's 8 clients left 0.35 s of it
        # (0.97). The limiter's exactness is the upper bound above, which load cannot loosen.
        # One never refused got all it asked for: on a loaded machine a few clients may not
        # manage to ask for the whole plan, which says nothing of the limiter.
        if run.statuses[429]:
            assert run.admitted >= 0.95 * run.allowed(ACCURACY_PLAN, run.admitting), report
        # Every replica admitted its part: one bucket shared, not one per replica.
        assert len(run.admitted_by_gateway) == REPLICAS, report
    # Tenant A hammered with 25x the clients; B still got its own full share (checked
    # above: 95% of its plan if it asked for more, else everything it asked for).
    assert run_a.statuses[429] > 10 * run_a.admitted, report

    # The daily quota was counted in the same script: exactly the admitted items, seen
    # alike from every replica.
    for url in shared.urls:
        for tenant, run in ((a, run_a), (b, run_b)):
            daily = quota(url, tenant)["daily"]
            assert isinstance(daily, dict)
            assert daily["used"] == run.admitted, (url, daily, report)


# -- plan changes -----------------------------------------------------------------------------


def test_a_plan_change_reaches_every_replica_within_the_cache_time(
    shared: Shared, admin: Admin
) -> None:
    small = admin.create_plan("small", PlanNumbers(rate=1.0, burst=5))
    big = admin.create_plan("big", PlanNumbers(rate=1.0, burst=50))
    tenant = admin.create_tenant("mover", small)
    ten_items = b'{"instances":[' + b",".join([b"{}"] * 10) + b"]}"
    for url in shared.urls:
        body = quota(url, tenant)
        assert body["plan"] == small
        assert body["bucket"] == {
            "capacity": 5,
            "remaining": 5.0,
            "refill_per_second": 1.0,
            "seconds_until_full": 0.0,
        }
        # More items than the burst: refused as a request that can never pass (4xx, not 429).
        response = httpx.post(url + PREDICT, headers=tenant.headers, content=ten_items)
        assert response.status_code == 422, response.text
        assert response.json()["type"].endswith("/too-many-items")

    admin.set_plan(tenant.id, big)
    changed = time.monotonic()
    seen: dict[str, float] = {}
    while len(seen) < len(shared.urls) and time.monotonic() - changed < 10.0:
        for url in shared.urls:
            if url not in seen:
                body = quota(url, tenant)
                bucket = body["bucket"]
                assert isinstance(bucket, dict)
                if body["plan"] == big and bucket["capacity"] == 50:
                    seen[url] = time.monotonic() - changed
        time.sleep(0.1)
    assert len(seen) == len(shared.urls), seen
    assert max(seen.values()) <= PLAN_CACHE_SECONDS + 1.0, seen

    # The limiter enforces the new plan too, on every replica (4 x 10 items <= 50).
    for url in shared.urls:
        response = httpx.post(url + PREDICT, headers=tenant.headers, content=ten_items)
        assert response.status_code == 200, response.text
        assert '"burst";q=50;' in response.headers["ratelimit-policy"]


# -- Redis outage -----------------------------------------------------------------------------


@dataclass
class Sent:
    """One request of the outage test, as its client saw it (times: time.monotonic())."""

    gateway: str
    sent: float
    received: float
    status: int
    retry_after: str | None
    problem_type: str | None


@dataclass
class Traffic:
    """Clients that send cost-1 requests until told to stop, recording every answer."""

    records: list[Sent] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def loop(
        self, client: httpx.AsyncClient, label: str, tenant: Tenant, pause: float = 0.0
    ) -> None:
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                response = await client.post(PREDICT, headers=tenant.headers, content=ONE_ITEM)
            except httpx.HTTPError as exc:
                self.errors.append(f"{label}: {exc!r}")
                await asyncio.sleep(0.05)
                continue
            problem = None
            if response.headers.get("content-type", "").startswith(PROBLEM_JSON):
                problem = str(response.json().get("type", "")).rsplit("/", 1)[-1]
            self.records.append(
                Sent(
                    label,
                    sent,
                    time.monotonic(),
                    response.status_code,
                    response.headers.get("retry-after"),
                    problem,
                )
            )
            if pause:
                await asyncio.sleep(pause)

    def of(self, label: str, after: float = 0.0, before: float = float("inf")) -> list[Sent]:
        return [
            r
            for r in self.records
            if r.gateway == label and after <= r.sent and r.received <= before
        ]


async def test_redis_outage_falls_back_and_the_shared_limiter_resumes(
    limits_edge: Edge, admin: Admin, tmp_path: Path
) -> None:
    numbers = PlanNumbers(rate=10.0, burst=10)
    plan = admin.create_plan("outage", numbers)
    # The open replicas' tenant asks far more than its plan; the closed replica's tenant
    # (a bucket of its own) asks less, so that all it ever gets refused is by the policy.
    tenant, quiet = admin.create_tenant("outage", plan), admin.create_tenant("quiet", plan)
    with private_redis(tmp_path) as redis_server:
        common = {"redis_url": redis_server.url, "replicas": "2", "plan_cache_seconds": "30"}
        specs = [
            limits_edge.gateway("open-1", ratelimit_failure_mode="open", **common),
            limits_edge.gateway("open-2", ratelimit_failure_mode="open", **common),
            limits_edge.gateway("closed", ratelimit_failure_mode="closed", **common),
        ]
        with running(specs, tmp_path) as gateways:
            await _outage(redis_server, gateways, tenant, quiet, numbers)
    # The fallback is announced in the log as well as in the metrics.
    for gateway in gateways[:2]:
        assert "shared rate limiter unavailable" in gateway.log_path.read_text(), gateway.name


async def _outage(
    redis_server: PrivateRedis,
    gateways: list[Service],
    tenant: Tenant,
    quiet: Tenant,
    numbers: PlanNumbers,
) -> None:
    labels = ["open-1", "open-2", "closed"]
    traffic = Traffic()
    clients = {
        label: httpx.AsyncClient(base_url=g.url, timeout=10.0)
        for label, g in zip(labels, gateways, strict=True)
    }
    try:
        for client in clients.values():  # warm the key and plan caches
            for who in (tenant, quiet):
                assert (await client.get("/v1/quota", headers=who.headers)).status_code == 200
        tasks = [
            asyncio.create_task(traffic.loop(clients[label], label, tenant))
            for label in ("open-1", "open-1", "open-2", "open-2")
        ]
        # 5 requests/s against a plan of 10/s: every refusal it sees is the failure policy's.
        tasks.append(asyncio.create_task(traffic.loop(clients["closed"], "closed", quiet, 0.2)))
        opened = ("open-1", "open-2")

        await asyncio.sleep(1.5)
        before = {label: await metrics(clients[label]) for label in opened}
        for label in opened:
            assert decisions(before[label], "shared") > 0, label
            assert decisions(before[label], "memory") == 0, label
            assert gauge(before[label], "ratelimit_fallback_active") == 0, label

        killed = time.monotonic()
        redis_server.kill()
        await asyncio.sleep(3.0)
        during = {label: await metrics(clients[label]) for label in opened}
        restarted = time.monotonic()
        await asyncio.to_thread(redis_server.start)
        restarted_ready = time.monotonic()
        restored = {label: await metrics(clients[label]) for label in opened}
        for label in opened:
            assert gauge(during[label], "ratelimit_fallback_active") == 1, label
            assert during[label][("ratelimit_backend_errors_total", ())] >= 1, label
            assert decided(during[label], "memory", "ok") > 0, label
            # The fallback limits: refusals by the memory bucket.
            assert decided(during[label], "memory", "rate") > 0, label

        # Within a few seconds every open replica is back on the shared limiter, and the
        # closed one admits again.
        resumed: dict[str, float] = {}
        while len(resumed) < len(labels) and time.monotonic() - restarted_ready < 8.0:
            for label in opened:
                if label in resumed:
                    continue
                now = await metrics(clients[label])
                if (
                    decisions(now, "shared") > decisions(during[label], "shared")
                    and gauge(now, "ratelimit_fallback_active") == 0
                ):
                    resumed[label] = time.monotonic() - restarted_ready
            if "closed" not in resumed and any(
                r.status == 200 for r in traffic.of("closed", after=restarted_ready)
            ):
                resumed["closed"] = time.monotonic() - restarted_ready
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # some traffic after the switch back
        traffic.stop.set()
        await asyncio.gather(*tasks)
        after = {label: await metrics(clients[label]) for label in opened}
    finally:
        for client in clients.values():
            await client.aclose()

    summary = {
        label: Counter(
            ("before", "during", "after")[(r.sent >= killed) + (r.sent >= restarted_ready)]
            + f" {r.status}"
            for r in traffic.of(label)
        )
        for label in labels
    }
    print(f"outage {restarted - killed:.1f} s; resumed after {resumed}; {summary}")
    assert not traffic.errors, traffic.errors[:5]
    assert set(resumed) == set(labels), resumed
    # The first try after Redis is back succeeds: at most one retry period, plus slack.
    assert max(resumed.values()) <= RETRY_SECONDS + 1.0, resumed
    for label in opened:
        records = traffic.of(label)
        statuses = {r.status for r in records}
        # No 5xx, no auth error, before, during or after the outage.
        assert statuses <= {200, 429}, (label, sorted(statuses))
        assert {r.problem_type for r in records if r.status == 429} <= {"rate-limited"}
        assert all(r.retry_after for r in records if r.status == 429)
        # During the outage the per-replica bucket (rate / 2 replicas, full burst) held.
        window = restarted - killed
        admitted = sum(1 for r in traffic.of(label, killed, restarted) if r.status == 200)
        assert admitted <= numbers.burst + numbers.rate / 2 * window + 1, (label, admitted)
        assert decided(after[label], "memory", "ok") >= decided(during[label], "memory", "ok")
        assert decisions(after[label], "shared") > decisions(during[label], "shared")
        assert gauge(after[label], "ratelimit_fallback_active") == 0
        # Once Redis is back, no call to it fails: connections left over from before the
        # outage are not handed out dead (each failure would mean 2 more s of fallback).
        errors = "ratelimit_backend_errors_total", ()
        assert after[label][errors] == restored[label][errors], label

    # `closed`: 503 + Retry-After while Redis is down, never before, 200s again after.
    closed = traffic.of("closed")
    assert {r.status for r in closed} <= {200, 503}, sorted({r.status for r in closed})
    assert all(r.status == 200 for r in closed if r.received < killed)
    unavailable = [r for r in closed if r.status == 503]
    assert unavailable, "the closed gateway never refused while Redis was down"
    # ...only while Redis is down, or until the gateway next tries it (every 2 s).
    late = [r.sent - restarted_ready for r in unavailable if r.sent > restarted_ready]
    assert all(killed <= r.received for r in unavailable)
    assert max(late, default=0.0) <= RETRY_SECONDS + 0.5, late
    assert all(r.retry_after is not None and r.retry_after.isdigit() for r in unavailable)
    assert all(r.problem_type == "unavailable" for r in unavailable), unavailable[:3]
    back = [r for r in closed if r.sent > restarted_ready and r.status == 200]
    assert back, "the closed gateway did not admit again after Redis came back"
    assert back[0].received - restarted_ready <= 5.0
