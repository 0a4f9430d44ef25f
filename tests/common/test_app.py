"""The common app: probes, problem+json errors, request ids, RED metrics by route template."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypedDict

import httpx
import pytest
from fastapi import Request
from pydantic import BaseModel
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from narthex.common.app import ServiceApp, service_app
from narthex.common.errors import Forbidden, Problem
from narthex.common.readiness import CheckResult
from narthex.common.settings import Environment, ServiceSettings
from narthex.testing.lifespan import Started, started
from tests.support.tokens import bearer, static_verifier

HEX32 = re.compile(r"[0-9a-f]{32}")


class Item(BaseModel):
    name: str
    count: int


class Teapot(Problem):
    status, type_slug, title = 418, "teapot", "I am a teapot"


class DemoState(TypedDict):
    """What the demo service's lifespan yields."""

    dependency: dict[str, bool]  # "up": what its readiness check reports; tests flip it


def build_app(*, tracing: bool = True, env: Environment = "dev") -> ServiceApp:
    @asynccontextmanager
    async def lifespan(app: ServiceApp) -> AsyncIterator[DemoState]:
        dependency = {"up": True}

        async def database() -> CheckResult:
            return CheckResult(dependency["up"], {"latency_ms": 1})

        app.readiness.add("database", database)
        yield DemoState(dependency=dependency)

    app = service_app(
        ServiceSettings(tracing=tracing, env=env),
        title="demo",
        description="Demo service.",
        lifespan=lifespan,
    )

    @app.get("/dependency")
    async def dependency(request: Request) -> dict[str, bool]:
        state: DemoState = request.scope["state"]
        return state["dependency"]

    @app.get("/items/{item_id}")
    async def get_item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    @app.post("/items")
    async def create_item(item: Item) -> Item:
        return item

    @app.get("/forbidden")
    async def forbidden() -> None:
        raise Forbidden("not yours", headers={"X-Why": "tenant"})

    @app.get("/teapot")
    async def teapot() -> None:
        raise Teapot()

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("db password is hunter2 at 10.0.0.7:5432")

    return app


@dataclass(frozen=True)
class Demo:
    app: ServiceApp
    running: Started[DemoState]


@pytest.fixture
async def demo() -> AsyncIterator[Demo]:
    app = build_app()
    async with started(app, DemoState) as running:
        yield Demo(app, running)


@pytest.fixture
async def client(demo: Demo) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=demo.running.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c


async def test_each_request_finds_the_lifespans_state(
    client: httpx.AsyncClient, demo: Demo
) -> None:
    assert (await client.get("/dependency")).json() == {"up": True}
    demo.running.state["dependency"]["up"] = False
    assert (await client.get("/dependency")).json() == {"up": False}


async def test_healthz_is_live(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_lists_each_dependency_and_follows_its_state(
    client: httpx.AsyncClient, demo: Demo
) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert body["checks"]["database"] == {"status": "up", "latency_ms": 1}
    assert body["checks"]["lifespan"]["status"] == "up"

    demo.running.state["dependency"]["up"] = False
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["database"]["status"] == "down"


async def test_readiness_check_that_raises_is_down_without_detail(
    client: httpx.AsyncClient, demo: Demo
) -> None:
    async def broken() -> CheckResult:
        raise ConnectionError("redis://:s3cret@10.1.2.3:6379 refused")

    demo.app.readiness.add("cache", broken)
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["cache"]["status"] == "down"
    assert "s3cret" not in response.text
    assert "10.1.2.3" not in response.text


async def test_not_ready_before_lifespan_started() -> None:
    app = build_app()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["lifespan"]["status"] == "down"


async def test_openapi_docs_are_served(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    assert "/items/{item_id}" in schema["paths"]
    assert (await client.get("/docs")).status_code == 200


@pytest.mark.parametrize("env", ["prod", "test"])
async def test_outside_dev_the_api_docs_are_not_served(env: Environment) -> None:
    app = build_app(env=env)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert (await c.get(path)).status_code == 404, path


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, object]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, object] = response.json()
    assert body["type"] == f"https://narthex.dev/problems/{slug}"
    assert body["status"] == status
    assert isinstance(body["title"], str)
    assert body["title"]
    assert body["request_id"] == response.headers["x-request-id"]
    assert isinstance(body["trace_id"], str)
    assert HEX32.fullmatch(body["trace_id"])
    return body


async def test_problem_exception_renders_with_headers(client: httpx.AsyncClient) -> None:
    response = await client.get("/forbidden")
    body = assert_problem(response, 403, "forbidden")
    assert body["detail"] == "not yours"
    assert body["instance"] == "/forbidden"
    assert response.headers["x-why"] == "tenant"


async def test_problem_subclass_renders(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/teapot"), 418, "teapot")


async def test_unknown_route_is_problem_404(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/nowhere"), 404, "not-found")


async def test_wrong_method_is_problem_405(client: httpx.AsyncClient) -> None:
    assert_problem(await client.delete("/items/1"), 405, "method-not-allowed")


async def test_validation_error_is_422_naming_the_field_without_echoing_input(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post("/items", json={"name": "x", "count": "nx_live_abc_SECRET"})
    body = assert_problem(response, 422, "validation-failed")
    assert "count" in str(body["detail"])
    assert "SECRET" not in response.text
    errors = body["errors"]
    assert isinstance(errors, list)
    assert errors[0]["loc"] == ["body", "count"]


async def test_malformed_json_is_4xx(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/items", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_problem(response, 422, "validation-failed")


async def test_unhandled_error_is_bare_500_without_internal_detail(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/boom")
    body = assert_problem(response, 500, "internal")
    assert "detail" not in body
    for leak in ("hunter2", "10.0.0.7", "RuntimeError", "Traceback"):
        assert leak not in response.text


async def test_well_formed_request_id_is_kept(client: httpx.AsyncClient) -> None:
    response = await client.get("/items/1", headers={"X-Request-ID": "req-2026.11.23:abc"})
    assert response.headers["x-request-id"] == "req-2026.11.23:abc"


@pytest.mark.parametrize(
    "incoming",
    ["short", "has spaces in it", "x" * 200, "semi;colon;value", "<script>alert(1)</script>"],
)
async def test_malformed_request_id_is_replaced(client: httpx.AsyncClient, incoming: str) -> None:
    response = await client.get("/items/1", headers={"X-Request-ID": incoming})
    assert response.headers["x-request-id"] != incoming
    assert HEX32.fullmatch(response.headers["x-request-id"])


async def test_missing_request_id_is_generated_and_unique(client: httpx.AsyncClient) -> None:
    ids = {(await client.get("/items/1")).headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5


async def test_incoming_traceparent_is_continued(client: httpx.AsyncClient) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    response = await client.get(
        "/forbidden", headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    )
    assert response.json()["trace_id"] == trace_id


async def test_metrics_use_route_templates_and_histograms(client: httpx.AsyncClient) -> None:
    for item_id in (1, 2, 3):
        await client.get(f"/items/{item_id}")
    await client.get("/nowhere/at/all")
    text = (await client.get("/metrics")).text
    assert (
        'http_requests_total{method="GET",route="/items/{item_id}",service="narthex",status="200"}'
        " 3.0" in text
    )
    assert 'route="/items/1"' not in text
    assert 'route="/nowhere/at/all"' not in text
    assert 'route="unmatched"' in text
    assert "http_request_duration_seconds_bucket" in text
    assert "http_requests_in_flight" in text


async def test_each_app_has_its_own_registry() -> None:
    first, second = build_app(tracing=False), build_app(tracing=False)
    assert first.metrics_registry is not second.metrics_registry


async def test_problem_body_is_valid_json_with_trace_when_tracing_off() -> None:
    app = build_app(tracing=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.get("/forbidden")
    body = json.loads(response.text)
    assert body["status"] == 403
    assert body["request_id"] == response.headers["x-request-id"]


async def test_inner_middleware_runs_after_the_token_check_and_the_body_cap() -> None:
    seen: list[tuple[str, bytes]] = []

    class Inner:
        """Answers every request itself, with what it was handed."""

        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            message = await receive()
            seen.append((scope["state"]["principal"].tenant, message["body"]))
            await JSONResponse({"inner": True})(scope, receive, send)

    app = service_app(
        ServiceSettings(tracing=False, env="dev", max_body_bytes=16),
        title="demo",
        description="Demo service.",
        authenticate=True,
        verifier=static_verifier,
        inner_middleware=[Middleware(Inner)],
    )
    async with started(app, dict) as running:
        transport = httpx.ASGITransport(app=running.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://demo") as client:
            caller = bearer(["tenant"], ["inference"])
            answered = await client.post("/anything", content=b"small", headers=caller)
            assert (answered.status_code, answered.json()) == (200, {"inner": True})
            assert "x-request-id" in answered.headers  # inside the request context
            assert (await client.post("/anything", content=b"small")).status_code == 401
            large = await client.post("/anything", content=b"x" * 17, headers=caller)
            assert large.status_code == 413
    assert seen == [("t_acme", b"small")]
