"""One renderer, chosen by the route's protocol: problem+json, OIP's `{"error"}`, OpenAI's
error object; the same for handlers and for middleware, and never a word of a bug."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from narthex.common.app import service_app
from narthex.common.errors import Conflict, protocol_of
from narthex.common.settings import ServiceSettings

SECRET = "password=hunter2 at /srv/app/secret.py"


@pytest.mark.parametrize(
    ("path", "protocol"),
    [
        ("/v2", "oip"),
        ("/v2/models/fraud/infer", "oip"),
        ("/v2x", "problem"),
        ("/v1/embeddings", "openai"),
        ("/v1/models", "openai"),
        ("/v1/models/minilm", "openai"),
        ("/v1/models/fraud/predict", "problem"),
        ("/v1/keys", "problem"),
        ("/healthz", "problem"),
    ],
)
def test_the_protocol_is_the_routes(path: str, protocol: str) -> None:
    assert protocol_of(path) == protocol


def build() -> FastAPI:
    app = service_app(
        ServiceSettings(tracing=False, env="dev", max_body_bytes=16),
        title="t",
        description="t",
    )
    for path in ("/v1/things", "/v2/things", "/v1/embeddings"):

        @app.post(path)
        async def conflict() -> None:
            raise Conflict("taken")

        @app.get(path)
        async def boom() -> None:
            raise RuntimeError(SECRET)

    return app


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = build()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t") as client,
    ):
        yield client


def message_of(response: httpx.Response, path: str) -> str:
    """The error's message, once its envelope is checked to be the protocol's of `path`."""
    body = response.json()
    if path.startswith("/v2"):
        assert response.headers["content-type"] == "application/json"
        assert set(body) == {"error"}
        return str(body["error"])
    if path == "/v1/embeddings":
        assert response.headers["content-type"] == "application/json"
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["request_id"] == response.headers["x-request-id"]
        return str(body["error"]["message"])
    assert response.headers["content-type"] == "application/problem+json"
    assert body["status"] == response.status_code
    assert body["request_id"] == response.headers["x-request-id"]
    return str(body.get("detail", body["title"]))


@pytest.mark.parametrize("path", ["/v1/things", "/v2/things", "/v1/embeddings"])
async def test_a_handlers_error_a_middlewares_and_a_bug_share_the_routes_shape(
    client: httpx.AsyncClient, path: str
) -> None:
    conflict = await client.post(path, content=b"{}")
    assert conflict.status_code == 409
    assert message_of(conflict, path) == "taken"

    too_large = await client.post(path, content=b"x" * 17)  # the body cap, a middleware
    assert too_large.status_code == 413
    assert "16 bytes" in message_of(too_large, path)

    bug = await client.get(path)
    assert bug.status_code == 500
    assert message_of(bug, path) == "Internal error"
    assert "hunter2" not in bug.text
    assert "secret" not in bug.text

    unknown = await client.delete(path)  # Starlette's own 405
    assert unknown.status_code == 405
    message_of(unknown, path)
