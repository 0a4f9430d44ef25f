"""Rate limits through the real gateway app: cost, 429s, headers, /v1/quota, Redis failure.

The gateway's limiter runs on a clock the test drives (`create_app(clock=...)`): refill,
Retry-After and the seconds to midnight are exact, and nothing waits for real time.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest
from http_sfv.list import List as SfList
from pydantic import AnyHttpUrl

from narthex.common import scopes
from narthex.common.plans import TenantLimits
from narthex.gateway.cost import count_request
from narthex.gateway.errors import InvalidBody
from narthex.gateway.main import create_app
from narthex.gateway.resources import GatewayState
from narthex.gateway.settings import GatewaySettings
from narthex.testing.clock import ManualClock
from narthex.testing.lifespan import started
from tests.support import tokens
from tests.support.plans import FixedPlans
from tests.support.redis import REDIS_URL, redis_scratch
from tests.support.upstream import UpstreamServer, refusing_port

# 2026-03-01 12:00:00 UTC: twelve hours before the daily quota resets.
NOON = datetime(2026, 3, 1, 12, tzinfo=UTC).timestamp()


def token(tenant: str, roles: tuple[str, ...] = (scopes.TENANT,)) -> str:
    return tokens.token(roles, scopes.scopes_for(set(roles)), tenant, plan="test", ttl=600)


def plan(**overrides: Any) -> TenantLimits:
    fields: dict[str, Any] = {
        "tenant": "",
        "plan": "tiny",
        "rate_per_second": 0.01,
        "burst": 3,
        "daily_quota": 1000,
        "max_items_per_request": 10,
        "allowed_models": (),
    }
    return TenantLimits(**{**fields, **overrides})


@contextlib.asynccontextmanager
async def gateway(
    upstream: UpstreamServer,
    tenant_plan: TenantLimits,
    *,
    clock: ManualClock | None = None,
    **settings: Any,
) -> AsyncIterator[httpx.AsyncClient]:
    url = AnyHttpUrl(upstream.url)
    app = create_app(
        GatewaySettings(
            tracing=False,
            auth_url=url,
            features_url=url,
            inference_url=url,
            analytics_url=url,
            **settings,
        ),
        verifier=tokens.static_verifier,
        background=False,  # no probes: the upstream's counts are the proxied requests
        clock=clock or ManualClock(NOON),
        plans=FixedPlans(tenant_plan),
    )
    async with (
        started(app, GatewayState) as gw,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=gw.app), base_url="http://gw"
        ) as client,
    ):
        client.headers["Authorization"] = f"Bearer {token('t_acme')}"
        yield client


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(NOON)


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamServer]:
    async with UpstreamServer() as server:
        yield server


async def statuses_of(gw: httpx.AsyncClient, n: int) -> list[int]:
    return [(await gw.post("/v1/models/m/predict", json=predict(1))).status_code for _ in range(n)]


def predict(n: int) -> dict[str, Any]:
    return {"instances": [{"amount": 1.0}] * n}


def parsed(response: httpx.Response, field: str) -> dict[str, dict[str, Any]]:
    items = SfList()
    items.parse(response.headers[field].encode())
    return {item.value: dict(item.params) for item in items}


# -- cost -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "field", "cost"),
    [
        (predict(4), "instances", 4),
        ({"input": ["a", "b", "c"]}, "input", 3),
        ({"input": "one text"}, "input", 1),
        ({"events": [{}] * 7}, "events", 7),
        (
            {"inputs": [{"name": "x", "shape": [5, 16], "datatype": "FP32", "data": []}]},
            "inputs",
            5,
        ),
        ({"inputs": []}, "inputs", 1),
        ({"inputs": [{"shape": [2, 3]}, {"shape": [9]}]}, "inputs", 9),  # the largest batch
        ({"inputs": [{"shape": [True, 3]}]}, "inputs", 1),  # no dimension: refused upstream
        ({"other": [1, 2]}, "instances", 1),
        ([1, 2, 3], "instances", 1),
        ({"instances": []}, "instances", 1),
    ],
)
def test_a_requests_cost_is_the_items_it_carries(body: Any, field: str, cost: int) -> None:
    counted = count_request(
        [(b"content-type", b"application/json")],
        orjson.dumps(body),
        field,
        binary_tensors=field == "inputs",
        limit=1 << 20,
    )
    assert counted.cost == cost
    assert not counted.rewritten  # plain UTF-8 JSON goes on untouched


def test_a_body_that_is_not_json_is_refused_not_charged_one() -> None:
    with pytest.raises(InvalidBody):
        count_request([], b"\x00binary", "inputs", binary_tensors=True, limit=1 << 20)
    with pytest.raises(InvalidBody):
        count_request([], b"instances=1", "instances", limit=1 << 20)
    assert count_request([], b"", "instances", limit=1 << 20).cost == 1


# -- decisions through the gateway ------------------------------------------------------------
async def test_the_bucket_admits_its_burst_then_429_with_headers(upstream: UpstreamServer) -> None:
    async with gateway(upstream, plan(burst=3)) as gw:
        admitted = [await gw.post("/v1/models/fraud/predict", json=predict(1)) for _ in range(3)]
        refused = await gw.post("/v1/models/fraud/predict", json=predict(1))
    assert [r.status_code for r in admitted] == [200, 200, 200]
    assert [parsed(r, "ratelimit")["burst"]["r"] for r in admitted] == [2, 1, 0]
    assert parsed(admitted[0], "ratelimit-policy")["burst"] == {"q": 3, "w": 300}
    assert parsed(admitted[0], "ratelimit-policy")["daily"] == {"q": 1000, "w": 86400}
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["type"].endswith("/rate-limited")
    assert int(refused.headers["retry-after"]) == 100  # one token at 0.01/s
    assert parsed(refused, "ratelimit")["burst"]["r"] == 0
    assert upstream.calls() == 3  # the refused request never reached the upstream


async def test_refill_admits_exactly_what_the_rate_allows(
    upstream: UpstreamServer, clock: ManualClock
) -> None:
    async with gateway(upstream, plan(rate_per_second=10.0, burst=2), clock=clock) as gw:
        for _ in range(2):
            assert (await gw.post("/v1/models/m/predict", json=predict(1))).status_code == 200
        assert (await gw.post("/v1/models/m/predict", json=predict(1))).status_code == 429
        clock.advance(0.25)  # 2.5 tokens' worth, capped at the burst of 2
        statuses = await statuses_of(gw, 3)
    assert statuses == [200, 200, 429]


async def test_cost_is_charged_per_item(upstream: UpstreamServer) -> None:
    async with gateway(upstream, plan(burst=10)) as gw:
        first = await gw.post("/v1/models/m/predict", json=predict(4))
        second = await gw.post("/v1/embeddings", json={"input": ["a", "b", "c"], "model": "minilm"})
    assert parsed(first, "ratelimit")["burst"]["r"] == 6
    assert parsed(second, "ratelimit")["burst"]["r"] == 3
    assert parsed(second, "ratelimit")["daily"]["r"] == 1000 - 7


async def test_more_items_than_the_plan_allows_is_a_clear_4xx(upstream: UpstreamServer) -> None:
    async with gateway(upstream, plan(burst=50, max_items_per_request=5)) as gw:
        response = await gw.post("/v1/models/m/predict", json=predict(6))
        after = await gw.get("/v1/quota")
    assert response.status_code == 422
    assert response.json()["type"].endswith("/too-many-items")
    assert "6 items" in response.json()["detail"]
    assert upstream.calls() == 0
    assert after.json()["bucket"]["remaining"] == 50  # nothing consumed


async def test_a_request_costing_more_than_the_burst_is_never_an_endless_429(
    upstream: UpstreamServer,
) -> None:
    async with gateway(upstream, plan(burst=3, max_items_per_request=10)) as gw:
        response = await gw.post("/v1/models/m/predict", json=predict(4))
        statuses = await statuses_of(gw, 3)
    assert response.status_code == 422
    assert "never be admitted" in response.json()["detail"]
    assert "retry-after" not in response.headers
    assert statuses == [200, 200, 200]  # the refusal consumed nothing


async def test_the_daily_quota_stops_at_exactly_its_limit(upstream: UpstreamServer) -> None:
    async with gateway(upstream, plan(burst=100, rate_per_second=100.0, daily_quota=5)) as gw:
        admitted = await gw.post("/v1/models/m/predict", json=predict(3))
        also = await gw.post("/v1/models/m/predict", json=predict(2))
        refused = await gw.post("/v1/models/m/predict", json=predict(1))
        view = (await gw.get("/v1/quota")).json()
    assert (admitted.status_code, also.status_code, refused.status_code) == (200, 200, 429)
    assert refused.json()["type"].endswith("/quota-exceeded")
    assert refused.headers["retry-after"] == str(12 * 3600)  # noon to midnight
    assert view["daily"] == {"limit": 5, "used": 5, "remaining": 0, "seconds_until_reset": 43200}
    assert view["bucket"]["remaining"] == 95  # the refusal took no tokens


async def test_tenants_do_not_share_limits(upstream: UpstreamServer) -> None:
    async with gateway(upstream, plan(burst=1)) as gw:
        a = await gw.post("/v1/models/m/predict", json=predict(1))
        other = {"Authorization": f"Bearer {token('t_other')}"}
        b = await gw.post("/v1/models/m/predict", json=predict(1), headers=other)
        a_again = await gw.post("/v1/models/m/predict", json=predict(1))
    assert (a.status_code, b.status_code, a_again.status_code) == (200, 200, 429)


async def test_quota_view_agrees_with_the_headers_and_consumes_nothing(
    upstream: UpstreamServer,
) -> None:
    async with gateway(upstream, plan(burst=5)) as gw:
        charged = await gw.post("/v1/models/m/predict", json=predict(2))
        views = [await gw.get("/v1/quota") for _ in range(3)]
    body = views[-1].json()
    assert body["tenant"] == "t_acme"
    assert body["plan"] == "tiny"
    assert body["bucket"]["capacity"] == 5
    assert body["bucket"]["remaining"] == 3
    assert body["bucket"]["refill_per_second"] == 0.01
    assert (
        parsed(views[-1], "ratelimit")["burst"]["r"] == parsed(charged, "ratelimit")["burst"]["r"]
    )
    assert body["daily"]["used"] == 2
    # Reading three times took nothing.
    assert [v.json()["bucket"]["remaining"] for v in views] == [3, 3, 3]


async def test_quota_of_another_tenant_is_for_admins_only(upstream: UpstreamServer) -> None:
    async with gateway(upstream, plan()) as gw:
        as_tenant = await gw.get("/v1/quota", params={"tenant": "t_other"})
        admin = {"Authorization": f"Bearer {token('t_ops', (scopes.ADMIN,))}"}
        as_admin = await gw.get("/v1/quota", params={"tenant": "t_other"}, headers=admin)
        anonymous = await gw.get("/v1/quota", headers={"Authorization": ""})
    assert as_tenant.status_code == 403
    assert as_admin.status_code == 200
    assert as_admin.json()["tenant"] == "t_other"
    assert anonymous.status_code == 401


async def test_admin_routes_are_not_rate_limited(upstream: UpstreamServer) -> None:
    admin = {"Authorization": f"Bearer {token('t_ops', (scopes.ADMIN,))}"}
    async with gateway(upstream, plan(burst=1)) as gw:
        statuses = [
            (await gw.get("/v1/admin/tenants", headers=admin)).status_code for _ in range(3)
        ]
    assert statuses == [200, 200, 200]


async def test_decisions_and_quota_are_counted_per_tenant(upstream: UpstreamServer) -> None:
    """One tenant floods; the other's series count only its own requests."""
    async with gateway(upstream, plan(burst=3, daily_quota=10)) as gw:
        flooded = await statuses_of(gw, 5)
        quiet = {"Authorization": f"Bearer {token('t_quiet')}"}
        calm = (await gw.post("/v1/models/m/predict", json=predict(2), headers=quiet)).status_code
        metrics = (await gw.get("/metrics")).text
    assert flooded == [200, 200, 200, 429, 429]
    assert calm == 200
    assert 'ratelimit_tenant_decisions_total{result="ok",tenant="t_acme"} 3.0' in metrics
    assert 'ratelimit_tenant_decisions_total{result="rate",tenant="t_acme"} 2.0' in metrics
    assert 'ratelimit_tenant_decisions_total{result="ok",tenant="t_quiet"} 1.0' in metrics
    assert 'result="rate",tenant="t_quiet"' not in metrics
    assert 'ratelimit_tenant_quota_used_ratio{tenant="t_acme"} 0.3' in metrics
    assert 'ratelimit_tenant_quota_used_ratio{tenant="t_quiet"} 0.2' in metrics


# -- the shared limiter and its failure policy ------------------------------------------------
async def test_replicas_share_one_bucket_in_redis(
    upstream: UpstreamServer, clock: ManualClock
) -> None:
    async with redis_scratch() as scratch:
        shared = {"redis_url": REDIS_URL, "ratelimit_prefix": scratch.prefix}
        async with (
            gateway(upstream, plan(burst=3), clock=clock, **shared) as one,
            gateway(upstream, plan(burst=3), clock=clock, **shared) as two,
        ):
            statuses = [
                (await replica.post("/v1/models/m/predict", json=predict(1))).status_code
                for replica in (one, two, one, two)
            ]
            metrics = (await one.get("/metrics")).text
    assert statuses == [200, 200, 200, 429]
    assert 'ratelimit_decisions_total{backend="shared",result="ok"} 2.0' in metrics


async def test_redis_down_fails_open_to_per_replica_limits_without_5xx(
    upstream: UpstreamServer,
) -> None:
    with refusing_port() as port:
        settings: dict[str, Any] = {"redis_url": f"redis://127.0.0.1:{port}/0", "replicas": 2}
        async with gateway(upstream, plan(burst=2, rate_per_second=0.01), **settings) as gw:
            statuses = [
                (await gw.post("/v1/models/m/predict", json=predict(1))).status_code
                for _ in range(3)
            ]
            metrics = (await gw.get("/metrics")).text
    assert statuses == [200, 200, 429]  # limited by the fallback, never a 5xx or a 401
    assert "ratelimit_fallback_active 1.0" in metrics
    assert "ratelimit_backend_errors_total 1.0" in metrics  # retried later, not per request


async def test_redis_down_fails_closed_with_503_and_retry_after(upstream: UpstreamServer) -> None:
    with refusing_port() as port:
        settings: dict[str, Any] = {
            "redis_url": f"redis://127.0.0.1:{port}/0",
            "ratelimit_failure_mode": "closed",
        }
        async with gateway(upstream, plan(), **settings) as gw:
            response = await gw.post("/v1/models/m/predict", json=predict(1))
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    assert upstream.calls() == 0
