"""`POST /v1/embeddings` pinned byte for byte: answers, every refusal's status and OpenAI error,
the order in which refusals win, headers, metrics, the access log and the API description.

Every test runs twice: on the app as built (its fast path, `narthex.inference.embeddings`,
answers) and with `embeddings_fast_path` off (FastAPI's declared route answers), which is how
the route answered before the fast path existed."""

from __future__ import annotations

import base64
import gzip
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import structlog
from starlette.responses import Response
from starlette.types import Receive, Scope

from narthex.common.errors import protocol_of
from narthex.inference import embeddings
from narthex.inference.traffic import KEY_HEADER, KEY_MAX_LENGTH
from tests.inference.test_app import serving
from tests.support.onnx_models import tiny_repository
from tests.support.tokens import token

NO_SCOPE = {"Authorization": f"Bearer {token(['tenant'], ['usage'])}"}
JSON = {"content-type": "application/json"}
ONE = b'{"model": "words", "input": "w1"}'
# What the tiny `words` model answers for "w1" (see tests.support.onnx_models).
W1 = {
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": [9.0, 3.0]}],
    "model": "words:1",
    "usage": {"prompt_tokens": 3, "total_tokens": 3},
}
ANSWER_HEADERS = ["x-narthex-model-version", "content-length", "content-type", "x-request-id"]
ERROR_HEADERS = ["content-length", "content-type", "x-request-id"]


@pytest.fixture(params=["fast path", "router"])
def answered_by(request: pytest.FixtureRequest) -> str:
    param: str = request.param
    return param


@pytest.fixture
def fast() -> list[bool]:
    """One item per request the fast path answered."""
    return []


@pytest.fixture
async def client(
    tmp_path: Path, answered_by: str, fast: list[bool], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[httpx.AsyncClient]:
    answers = embeddings._answer

    async def answer(scope: Scope, receive: Receive) -> Response:
        fast.append(True)
        return await answers(scope, receive)

    monkeypatch.setattr(embeddings, "_answer", answer)
    async with serving(
        tiny_repository(tmp_path),
        max_body_bytes=4096,
        env="dev",
        embeddings_fast_path=answered_by == "fast path",
    ) as (_, client):
        yield client
    assert answered_by == "fast path" or not fast


def error(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    kinds = {400: "invalid_request_error", 403: "permission_error", 404: "not_found_error"}
    return {
        "status": status,
        "error": {"message": message, "type": kinds[status], "param": param, "code": code},
    }


def parse_failed(param: str | None = None) -> dict[str, Any]:
    return error(400, "There was an error parsing the body", "bad_request", param)


NOT_AN_OBJECT = error(
    400,
    "body: Input should be a valid dictionary or object to extract fields from",
    "validation_failed",
)

# name, request (httpx keyword arguments), the answer: a status and an OpenAI error, or W1.
CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("one text", {"json": {"model": "words", "input": "w1"}}, W1),
    (
        "charset",
        {"content": ONE, "headers": {"content-type": "application/json; charset=utf-8"}},
        W1,
    ),
    ("+json", {"content": ONE, "headers": {"content-type": "application/vnd.x+json"}}, W1),
    # json.loads' encoding detection, which FastAPI's body parsing relies on.
    ("utf-16", {"content": ONE.decode().encode("utf-16"), "headers": JSON}, W1),
    ("unknown fields", {"json": {"model": "words", "input": "w1", "user": "u", "zzz": 1}}, W1),
    ("lax int", {"json": {"model": "words", "input": "w1", "dimensions": "2"}}, W1),
    ("pinned", {"json": {"model": "words:1", "input": "w1"}}, W1),
    ("key", {"json": {"model": "words", "input": "w1"}, "headers": {KEY_HEADER: "k" * 256}}, W1),
    (
        "bad json",
        {"content": b'{"model": "words", "input": ', "headers": JSON},
        error(400, "body.28: JSON decode error", "validation_failed", "28"),
    ),
    (
        "not utf-8",
        {"content": b'{"model": "words", "input": "\xff"}', "headers": JSON},
        parse_failed(),
    ),
    # Content codings are not undone on this route (the gateway forwards bodies decoded).
    (
        "gzip",
        {"content": gzip.compress(ONE), "headers": {**JSON, "content-encoding": "gzip"}},
        parse_failed(),
    ),
    # FastAPI's strict content type: without `application/json` the body is not JSON.
    ("no content type", {"content": ONE}, NOT_AN_OBJECT),
    ("text/plain", {"content": ONE, "headers": {"content-type": "text/plain"}}, NOT_AN_OBJECT),
    ("array", {"json": [1]}, NOT_AN_OBJECT),
    ("null", {"content": b"null", "headers": JSON}, NOT_AN_OBJECT),
    ("a string", {"content": b'"w1"', "headers": JSON}, NOT_AN_OBJECT),
    # The first of repeated headers counts, as Starlette's Headers.get has it.
    (
        "content types",
        {"content": ONE, "headers": [("content-type", "text/plain"), *JSON.items()]},
        NOT_AN_OBJECT,
    ),
    (
        "keys",
        {
            "json": {"model": "words", "input": "w1"},
            "headers": [(KEY_HEADER, "k"), (KEY_HEADER, "k" * 257)],
        },
        W1,
    ),
    (
        "empty",
        {"content": b"", "headers": JSON},
        error(400, "body: Field required", "validation_failed"),
    ),
    (
        "five errors",
        {"json": {"input": 5, "encoding_format": "hex", "dimensions": 0, "user": 1}},
        error(
            400,
            "body.input.str: Input should be a valid string; body.input.list[str]: Input should be"
            " a valid list; body.model: Field required; body.encoding_format: Input should be"
            " 'float' or 'base64'; body.dimensions: Input should be greater than or equal to 1",
            "validation_failed",
            "input.str",
        ),
    ),
    (
        "nan",
        {"content": b'{"model": "words", "input": "w1", "dimensions": NaN}', "headers": JSON},
        error(
            400,
            "body.dimensions: Input should be a finite number",
            "validation_failed",
            "dimensions",
        ),
    ),
    (
        "key too long",
        {"json": {"model": "words", "input": "w1"}, "headers": {KEY_HEADER: "k" * 257}},
        error(
            400,
            f"header.{KEY_HEADER}: String should have at most {KEY_MAX_LENGTH} characters",
            "validation_failed",
            f"header.{KEY_HEADER}",
        ),
    ),
    (
        "key too long and no input",
        {"json": {"model": "words"}, "headers": {KEY_HEADER: "k" * 257}},
        error(
            400,
            f"header.{KEY_HEADER}: String should have at most {KEY_MAX_LENGTH} characters;"
            " body.input: Field required",
            "validation_failed",
            f"header.{KEY_HEADER}",
        ),
    ),
    (
        "dimensions",
        {"json": {"model": "words", "input": "w1", "dimensions": 8}},
        error(
            400,
            "words embeddings have 2 dimensions; it cannot give 8",
            "invalid_input",
            "dimensions",
        ),
    ),
    (
        "not a text model",
        {"json": {"model": "affine", "input": "w1"}},
        error(400, "affine is not a text model", "invalid_input", "model"),
    ),
    (
        "bad version",
        {"json": {"model": "words:x", "input": "w1"}},
        error(404, "version 'x' is not a version number", "model_not_found"),
    ),
    # The scope is checked once the body is parsed as JSON, before it is validated.
    (
        "no scope",
        {"json": {"model": "words", "input": "w1"}, "headers": NO_SCOPE},
        error(403, "requires the inference scope", "forbidden"),
    ),
    (
        "no scope, bad body",
        {"json": {"x": 1}, "headers": NO_SCOPE},
        error(403, "requires the inference scope", "forbidden"),
    ),
    (
        "no scope, bad json",
        {"content": b"{", "headers": {**JSON, **NO_SCOPE}},
        error(400, "body.1: JSON decode error", "validation_failed", "1"),
    ),
    (
        "no scope, not utf-8",
        {"content": b'"\xff"', "headers": {**JSON, **NO_SCOPE}},
        parse_failed(),
    ),
]


@pytest.mark.parametrize(
    ("request_", "expected"), [(r, e) for _, r, e in CASES], ids=[c[0] for c in CASES]
)
async def test_answers_and_refusals(
    client: httpx.AsyncClient,
    answered_by: str,
    fast: list[bool],
    request_: dict[str, Any],
    expected: dict[str, Any],
) -> None:
    with structlog.testing.capture_logs() as logs:
        response = await client.post("/v1/embeddings", **request_)
    assert fast == ([True] if answered_by == "fast path" else [])
    [access] = [line for line in logs if line.get("event") == "request" and "route" in line]
    assert access["route"] == "/v1/embeddings"
    assert access["tenant"] == "t_acme"
    if expected is W1:
        assert response.status_code == 200, response.text
        assert list(response.headers) == ANSWER_HEADERS
        assert response.headers["x-narthex-model-version"] == "1"
        assert response.headers["content-type"] == "application/json"
        assert response.content == orjson.dumps(W1)  # compact, in this key order
        assert access["status"] == 200
        return
    assert response.status_code == expected["status"], response.text
    assert list(response.headers) == ERROR_HEADERS
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body == {"error": expected["error"], "request_id": response.headers["x-request-id"]}
    assert response.content == orjson.dumps(body)
    assert access["status"] == expected["status"]


async def test_base64_and_many_texts(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/embeddings",
        json={"model": "words:1", "input": ["w1", "w2 w2"], "encoding_format": "base64"},
    )
    body = response.json()
    assert [d["index"] for d in body["data"]] == [0, 1]
    vectors = [
        np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4").tolist() for d in body["data"]
    ]
    assert vectors == [[9.0, 3.0], [15.0, 4.0]]
    assert body["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert body["model"] == "words:1"


async def test_refusals_before_the_route(client: httpx.AsyncClient, fast: list[bool]) -> None:
    """The token check and the body cap answer before any route, in the route's protocol."""
    anonymous = await client.post(
        "/v1/embeddings", json={"model": "words", "input": "w1"}, headers={"Authorization": ""}
    )
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == 'Bearer realm="narthex"'
    assert anonymous.json()["error"]["type"] == "authentication_error"
    large = await client.post("/v1/embeddings", content=b"x" * 5000, headers=JSON)
    assert large.status_code == 413
    assert large.json()["error"]["code"] == "payload_too_large"
    assert not fast


async def test_other_methods_and_paths_are_the_routers(
    client: httpx.AsyncClient, fast: list[bool]
) -> None:
    get = await client.get("/v1/embeddings")
    assert (get.status_code, get.headers["allow"]) == (405, "POST")
    assert get.json()["error"]["code"] == "method_not_allowed"
    slash = await client.post("/v1/embeddings/", json={"model": "words", "input": "w1"})
    assert (slash.status_code, slash.headers["location"]) == (307, "http://inference/v1/embeddings")
    assert not fast


async def test_requests_are_counted_by_route(client: httpx.AsyncClient) -> None:
    await client.post("/v1/embeddings", json={"model": "words", "input": "w1"})
    await client.post("/v1/embeddings", json={"model": "gpt-9", "input": "w1"})
    metrics = (await client.get("/metrics")).text
    for status in ("200", "404"):
        line = (
            f'http_requests_total{{method="POST",route="/v1/embeddings",service="inference",'
            f'status="{status}"}} 1.0'
        )
        assert line in metrics, status
    # The warm-up sample is the first.
    assert 'inference_requests_total{model="words",outcome="ok",version="1"} 2.0' in metrics


async def test_the_api_description_lists_the_route(client: httpx.AsyncClient) -> None:
    operation = (await client.get("/openapi.json")).json()["paths"]["/v1/embeddings"]["post"]
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/EmbeddingsRequest"}
    assert [p["name"] for p in operation["parameters"]] == [KEY_HEADER]
    assert "EmbeddingsResponse" in str(operation["responses"]["200"])
    assert protocol_of("/v1/embeddings") == "openai"
