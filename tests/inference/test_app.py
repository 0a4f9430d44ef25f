"""The inference app through its factory and lifespan, on tiny exact models: every protocol,
bad inputs, limits, deadlines, version pinning and swaps, admin, authorization."""

from __future__ import annotations

import asyncio
import base64
import gzip
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from narthex.inference.main import create_app
from narthex.inference.routes import InferenceState
from narthex.inference.settings import InferenceSettings
from narthex.inference.text import TextEncoder
from narthex.testing.lifespan import started
from tests.support.onnx_models import tiny_repository
from tests.support.tokens import bearer, static_verifier, token

CALLER = bearer(["tenant"], ["inference"])
ADMIN = bearer(["admin"], ["admin", "inference"])


@asynccontextmanager
async def serving(
    root: Path, **settings: Any
) -> AsyncIterator[tuple[InferenceState, httpx.AsyncClient]]:
    """The app started, a caller's client to it, and its lifespan's state."""
    config = InferenceSettings(model_repository=root, tracing=False, **settings)
    app = create_app(config, verifier=static_verifier)
    async with (
        started(app, InferenceState) as running,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=running.app),
            base_url="http://inference",
            headers=CALLER,
        ) as client,
    ):
        yield running.state, client


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(tiny_repository(tmp_path)) as (_, client):
        yield client


def oip_body(
    inputs: list[triton.InferInput], outputs: list[triton.InferRequestedOutput] | None = None
) -> tuple[bytes, dict[str, str]]:
    body, json_size = triton.InferenceServerClient.generate_request_body(inputs, outputs=outputs)
    headers = {} if json_size is None else {"Inference-Header-Content-Length": str(json_size)}
    return body, headers


def parse(response: httpx.Response) -> triton.InferResult:
    length = response.headers.get("Inference-Header-Content-Length")
    return triton.InferenceServerClient.parse_response_body(
        response.content, header_length=None if length is None else int(length)
    )


def x_input(array: np.ndarray[Any, Any], binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("x", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


# -- answers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False])
async def test_oip_infer_binary_and_json(client: httpx.AsyncClient, binary: bool) -> None:
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    outputs = [triton.InferRequestedOutput("total", binary_data=binary)]
    body, headers = oip_body([x_input(x, binary)], outputs)
    response = await client.post("/v2/models/affine/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    result = parse(response)
    np.testing.assert_allclose(result.as_numpy("total"), (x * 3 + 1).sum(axis=1))
    assert result.as_numpy("y") is None  # only what was asked for
    answer = result.get_response()
    assert (answer["model_name"], answer["model_version"]) == ("affine", "2")


async def test_oip_pinned_version_and_metadata(client: httpx.AsyncClient) -> None:
    x = np.ones((2, 3), dtype=np.float32)
    body, headers = oip_body([x_input(x, True)])
    response = await client.post(
        "/v2/models/affine/versions/1/infer", content=body, headers=headers
    )
    result = parse(response)
    np.testing.assert_allclose(result.as_numpy("y"), x * 2 + 1)
    assert result.get_response()["model_version"] == "1"

    metadata = (await client.get("/v2/models/affine")).json()
    assert metadata["versions"] == ["1", "2"]
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
    assert metadata["parameters"]["provider"] == "CPUExecutionProvider"
    assert (await client.get("/v2/models/affine/versions/1/ready")).status_code == 200
    assert (await client.get("/v2/models/affine/versions/7/ready")).status_code == 404
    assert (await client.get("/v2/health/ready")).status_code == 200
    assert (await client.get("/v2")).json()["extensions"] == ["binary_tensor_data"]


async def test_oip_gzip_request_body(client: httpx.AsyncClient) -> None:
    body, headers = oip_body([x_input(np.zeros((1, 3), np.float32), True)])
    response = await client.post(
        "/v2/models/affine/infer",
        content=gzip.compress(body),
        headers={**headers, "Content-Encoding": "gzip"},
    )
    np.testing.assert_allclose(parse(response).as_numpy("total"), [3.0])


async def test_oip_text_model(client: httpx.AsyncClient) -> None:
    text = triton.InferInput("text", [3], "BYTES")
    text.set_data_from_numpy(np.array([b"w1 w2", b"w5", b"w3 w3 w3"], dtype=np.object_))
    body, headers = oip_body([text])
    response = await client.post("/v2/models/words/infer", content=body, headers=headers)
    # [CLS]=2 ... [SEP]=3; w<i> is id i+3; only real tokens count, never padding.
    np.testing.assert_allclose(
        parse(response).as_numpy("embedding"), [[14, 4], [13, 3], [2 + 6 * 3 + 3, 5]]
    )


async def test_v1_predict_lists_objects_and_pins(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/models/affine/predict",
        json={"instances": [[1, 2, 3], {"a": 0, "b": 0, "c": 1}]},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["version"]) == ("affine", "2")
    assert body["predictions"] == [
        {"y": [4.0, 7.0, 10.0], "total": 21.0},
        {"y": [1.0, 1.0, 4.0], "total": 6.0},
    ]
    pinned = await client.post(
        "/v1/models/affine/versions/1/predict", json={"instances": [[1, 1, 1]]}
    )
    assert pinned.json()["version"] == "1"
    assert pinned.json()["predictions"][0]["total"] == 9.0


async def test_a_large_text_request_is_tokenized_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(tiny_repository(tmp_path)) as (state, client):
        encoder: TextEncoder | None = state["registry"].resolve("words").encoder
        assert encoder is not None
        encode = encoder.encode
        on_loop: list[bool] = []
        loop_thread = threading.get_ident()

        def recording(texts: list[str]) -> list[list[int]]:
            on_loop.append(threading.get_ident() == loop_thread)
            return encode(texts)

        monkeypatch.setattr(encoder, "encode", recording)
        small = await client.post("/v1/embeddings", json={"model": "words", "input": "w1 w2"})
        texts = ["w1 w2 w3 " * 20] * 10  # 1800 characters in all
        large = await client.post("/v1/embeddings", json={"model": "words", "input": texts})
        assert (small.status_code, large.status_code) == (200, 200), large.text
        assert len(large.json()["data"]) == 10
    # One short text is cheaper to tokenize than a thread hop; many long ones would stall
    # every other request on the loop.
    assert on_loop == [True, False]


async def test_embeddings_float_and_base64(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/embeddings", json={"model": "words", "input": "w1 w2"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list"
    assert body["model"] == "words:1"
    assert body["data"] == [{"object": "embedding", "index": 0, "embedding": [14.0, 4.0]}]
    assert body["usage"] == {"prompt_tokens": 4, "total_tokens": 4}

    encoded = await client.post(
        "/v1/embeddings",
        json={"model": "words:1", "input": ["w1", "w2 w2"], "encoding_format": "base64"},
    )
    vectors = [
        np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4").tolist()
        for d in encoded.json()["data"]
    ]
    assert vectors == [[9.0, 3.0], [15.0, 4.0]]
    assert encoded.json()["usage"]["prompt_tokens"] == 7


async def test_models_list(client: httpx.AsyncClient) -> None:
    body = (await client.get("/v1/models")).json()
    assert [m["id"] for m in body["data"]] == ["affine", "words"]
    affine = body["data"][0]
    assert affine["default_version"] == "2"
    assert [(v["version"], v["default"]) for v in affine["versions"]] == [
        ("1", False),
        ("2", True),
    ]
    assert affine["versions"][0]["training_metrics"] == {"scale": 2.0}


# -- bad input: a clear 4xx in each protocol's own envelope ------------------------------------

BAD_OIP = [
    ("wrong shape", [x_input(np.zeros((2, 4), np.float32), True)], "shape [2, 4]"),
    ("NaN", [x_input(np.array([[1, np.nan, 3]], np.float32), True)], "NaN"),
    ("infinity", [x_input(np.array([[np.inf, 0, 3]], np.float32), True)], "NaN or infinity"),
    ("empty batch", [x_input(np.zeros((0, 3), np.float32), True)], "at least one"),
    ("too many", [x_input(np.zeros((101, 3), np.float32), True)], "at most 100"),
]


@pytest.mark.parametrize(("case", "inputs", "message"), BAD_OIP, ids=[c[0] for c in BAD_OIP])
async def test_bad_oip_input_is_400_with_an_error(
    client: httpx.AsyncClient, case: str, inputs: list[triton.InferInput], message: str
) -> None:
    body, headers = oip_body(inputs)
    response = await client.post("/v2/models/affine/infer", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]
    assert set(response.json()) == {"error"}


async def test_wrong_dtype_unknown_output_and_model(client: httpx.AsyncClient) -> None:
    as_int = triton.InferInput("x", [1, 3], "INT64")
    as_int.set_data_from_numpy(np.zeros((1, 3), np.int64))
    body, headers = oip_body([as_int])
    response = await client.post("/v2/models/affine/infer", content=body, headers=headers)
    assert response.status_code == 400
    assert response.json() == {"error": "input 'x' must be FP32, not INT64"}

    body, headers = oip_body(
        [x_input(np.zeros((1, 3), np.float32), True)], [triton.InferRequestedOutput("nope")]
    )
    response = await client.post("/v2/models/affine/infer", content=body, headers=headers)
    assert response.status_code == 400
    assert response.json() == {"error": "unknown output 'nope' (the model has: total, y)"}

    response = await client.post("/v2/models/absent/infer", content=body, headers=headers)
    assert response.status_code == 404
    assert "absent" in response.json()["error"]

    response = await client.post("/v2/models/affine/infer", content=b"{not json")
    assert response.status_code == 400
    assert set(response.json()) == {"error"}


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"instances": []}, "at least one"),
        ({"instances": [[1, 2]]}, "has 2 values"),
        ({"instances": [[1, 2, "3"]]}, "not a number"),
        ({"instances": [[1, 2, True]]}, "not a number"),
        ({"instances": [{"a": 1, "b": 2}]}, "missing features ['c']"),
        ({"instances": [[0, 0, 0]] * 101}, "at most 100"),
        ({"instances": "nope"}, "instances"),
    ],
)
async def test_bad_v1_input_is_a_422_problem(
    client: httpx.AsyncClient, payload: dict[str, Any], message: str
) -> None:
    response = await client.post("/v1/models/affine/predict", json=payload)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert message in response.json()["detail"]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"model": "words", "input": []}, "at least one"),
        ({"model": "words", "input": [""]}, "input[0] is empty"),
        ({"model": "words", "input": ["w1"] * 101}, "at most 100"),
        ({"model": "words", "input": ["w1 " * 400_000]}, "over 16384 bytes"),
        ({"model": "words", "input": [[1, 2, 3]]}, "input"),
        ({"model": "words", "input": "w1", "dimensions": 8}, "2 dimensions"),
        ({"model": "affine", "input": "w1"}, "not a text model"),
        ({"input": "w1"}, "model"),
    ],
)
async def test_bad_embeddings_input_is_an_openai_error(
    client: httpx.AsyncClient, payload: dict[str, Any], message: str
) -> None:
    response = await client.post("/v1/embeddings", json=payload)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"]
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


async def test_unknown_embeddings_model_is_404_in_openai_shape(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/embeddings", json={"model": "gpt-9", "input": "w1"})
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


async def test_text_over_the_token_limit_truncates_or_is_refused(tmp_path: Path) -> None:
    long_text = " ".join(["w1"] * 40)
    async with serving(tiny_repository(tmp_path / "cut", max_tokens=8)) as (_, client):
        response = await client.post("/v1/embeddings", json={"model": "words", "input": long_text})
        assert response.json()["usage"]["prompt_tokens"] == 8
    root = tiny_repository(tmp_path / "refuse", max_tokens=8, truncate=False)
    async with serving(root) as (_, client):
        response = await client.post("/v1/embeddings", json={"model": "words", "input": long_text})
        assert response.status_code == 400
        assert "42 tokens" in response.json()["error"]["message"]


async def test_a_body_over_the_limit_is_413(tmp_path: Path) -> None:
    async with serving(tiny_repository(tmp_path), max_body_bytes=4096) as (_, client):
        response = await client.post("/v2/models/affine/infer", content=b"x" * 5000)
        assert response.status_code == 413


# -- queue, deadlines -----------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and want in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_full_queue_is_503_with_retry_after(tmp_path: Path) -> None:
    root = tiny_repository(tmp_path, max_batch_size=1, max_queue_size=2, max_queue_delay_ms=50)
    async with serving(root) as (_, client):
        payload = {"instances": [[1, 2, 3]]}
        responses = await asyncio.gather(
            *(client.post("/v1/models/affine/predict", json=payload) for _ in range(20))
        )
        statuses = [r.status_code for r in responses]
        assert 200 in statuses, statuses
        assert 503 in statuses, statuses
        refused = next(r for r in responses if r.status_code == 503)
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["type"].endswith("/overloaded")
        metrics = (await client.get("/metrics")).text
        rejected = metric(metrics, "inference_queue_rejected_total", reason="full", version="2")
        assert rejected == statuses.count(503)

        # Text is refused before it is tokenized, and counted the same way.
        body = {"model": "words", "input": ["w1 w2"]}
        responses = await asyncio.gather(
            *(client.post("/v1/embeddings", json=body) for _ in range(20))
        )
        statuses = [r.status_code for r in responses]
        assert 503 in statuses, statuses
        refused = next(r for r in responses if r.status_code == 503)
        assert refused.headers["retry-after"] == "1"
        metrics = (await client.get("/metrics")).text
        # (labels in the exposition's alphabetical order)
        rejected = metric(
            metrics, "inference_queue_rejected_total", model="words", reason="full", version="1"
        )
        failed = metric(
            metrics, "inference_requests_total", model="words", outcome="failed", version="1"
        )
        assert rejected == failed == statuses.count(503)


async def test_a_refusal_is_held_before_it_is_answered(tmp_path: Path) -> None:
    root = tiny_repository(tmp_path, max_batch_size=1, max_queue_size=2, max_queue_delay_ms=50)
    async with serving(root, refusal_hold=0.25) as (state, client):
        holds: list[float] = []

        async def hold(seconds: float) -> None:  # as asyncio.sleep, without the wait
            holds.append(seconds)

        state["service"].wait = hold
        payload = {"instances": [[1, 2, 3]]}
        responses = await asyncio.gather(
            *(client.post("/v1/models/affine/predict", json=payload) for _ in range(20))
        )
        refused = [r for r in responses if r.status_code == 503]
        assert refused
        # Every refusal waited the hold, spread +-50% (its deadline, 30 s away, did not cut
        # it short).
        assert len(holds) == len(refused)
        assert all(0.125 <= seconds <= 0.375 for seconds in holds), holds
        # Never past the caller's own deadline.
        state["service"].refusal_hold = 3600.0
        holds.clear()
        responses = await asyncio.gather(
            *(
                client.post(
                    "/v1/models/affine/predict",
                    json=payload,
                    headers={"x-request-timeout-ms": "10000"},
                )
                for _ in range(20)
            )
        )
        refused = [r for r in responses if r.status_code == 503]
        assert refused
        assert len(holds) == len(refused)
        assert all(0 < seconds <= 10.0 for seconds in holds), holds


async def test_an_expired_deadline_is_dropped_before_compute(tmp_path: Path) -> None:
    # With other requests waiting, a batch waits 200 ms for company; a request with 20 ms
    # left expires meanwhile.
    root = tiny_repository(tmp_path, max_queue_delay_ms=200)
    async with serving(root) as (state, client):
        loaded = state["registry"].resolve("affine")
        row = {"x": np.ones((1, 3), dtype=np.float32)}
        # Two requests queued before the batcher runs: it has company, so it waits.
        company = [
            asyncio.ensure_future(loaded.infer(row, tenant="other", deadline=float("inf")))
            for _ in range(2)
        ]
        response = await client.post(
            "/v1/models/affine/predict",
            json={"instances": [[1, 2, 3]]},
            headers={"x-request-timeout-ms": "20"},
        )
        assert response.status_code == 504
        await asyncio.gather(*company)
        metrics = (await client.get("/metrics")).text
        assert metric(metrics, "inference_deadline_dropped_total", version="2") == 1
        assert metric(metrics, "inference_batch_size_count", model="affine", version="2") == 2
        assert metric(metrics, "inference_batch_size_sum", model="affine", version="2") == 3
        # ...the warm-up and the company's: nothing was computed for the dropped request.


# -- versions: load, default swap under load, unload --------------------------------------------


async def test_swapping_the_default_under_load_fails_nothing(tmp_path: Path) -> None:
    async with serving(tiny_repository(tmp_path)) as (_, client):
        versions: list[str] = []
        failures: list[str] = []
        stop = asyncio.Event()

        async def caller() -> None:
            while not stop.is_set():
                response = await client.post(
                    "/v1/models/affine/predict", json={"instances": [[1, 1, 1]]}
                )
                if response.status_code != 200:
                    failures.append(response.text)
                    continue
                body = response.json()
                total = body["predictions"][0]["total"]
                # The answer is the named version's: v1 gives 9, v2 gives 12.
                assert total == {"1": 9.0, "2": 12.0}[body["version"]]
                versions.append(body["version"])

        callers = [asyncio.create_task(caller()) for _ in range(32)]
        await asyncio.sleep(0.2)
        swap = await client.put(
            "/v1/admin/models/affine/default", json={"version": 1}, headers=ADMIN
        )
        assert swap.status_code == 200, swap.text
        assert swap.json()["default_version"] == "1"
        await asyncio.sleep(0.2)
        unload = await client.post("/v1/admin/models/affine/versions/2/unload", headers=ADMIN)
        assert unload.json() == {"model": "affine", "version": "2", "drained": True}
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*callers)
    assert failures == []
    assert versions[0] == "2"
    assert versions[-1] == "1"
    switched = versions.index("1")
    assert set(versions[switched + 64 :]) == {"1"}  # after the swap (and in-flight), only v1


async def test_admin_load_unload_and_their_refusals(tmp_path: Path) -> None:
    root = tiny_repository(tmp_path, affine_versions={1: 2.0, 2: 3.0, 3: 5.0})
    # Policy latest 3 would serve all; the setting narrows start-up to the default model set.
    async with serving(root) as (_, client):
        response = await client.post("/v1/admin/models/affine/versions/2/unload", headers=ADMIN)
        assert response.status_code == 200
        refused = await client.post("/v1/admin/models/affine/versions/3/unload", headers=ADMIN)
        assert refused.status_code == 409  # the default
        assert "default" in refused.json()["detail"]
        loaded = await client.post(
            "/v1/admin/models/affine/versions/2/load", json={"default": True}, headers=ADMIN
        )
        assert loaded.status_code == 200
        assert loaded.json()["default_version"] == "2"
        missing = await client.post("/v1/admin/models/affine/versions/9/load", headers=ADMIN)
        assert missing.status_code == 404
        # Only admins.
        assert (await client.post("/v1/admin/models/affine/versions/1/unload")).status_code == 403


async def test_a_tampered_model_file_is_refused_at_load(tmp_path: Path) -> None:
    root = tiny_repository(tmp_path)
    model = root / "affine" / "2" / "model.onnx"
    model.write_bytes(model.read_bytes() + b"\0")
    async with serving(root, models=["words"]) as (_, client):
        response = await client.post("/v1/admin/models/affine/versions/2/load", headers=ADMIN)
        assert response.status_code == 422
        assert "sha256" in response.json()["detail"]


async def test_start_up_fails_on_a_tampered_default(tmp_path: Path) -> None:
    root = tiny_repository(tmp_path)
    (root / "affine" / "1" / "model.onnx").write_bytes(b"garbage")
    app = create_app(
        InferenceSettings(model_repository=root, tracing=False), verifier=static_verifier
    )
    with pytest.raises(Exception, match="sha256"):
        async with app.router.lifespan_context(app):
            pass


# -- authorization ----------------------------------------------------------------------------

ROUTES: list[tuple[str, str, Callable[[], dict[str, Any]]]] = [
    ("POST", "/v1/models/affine/predict", lambda: {"json": {"instances": [[1, 2, 3]]}}),
    ("POST", "/v1/embeddings", lambda: {"json": {"model": "words", "input": "w1"}}),
    ("GET", "/v1/models", dict),
    ("GET", "/v2/models/affine", dict),
]


@pytest.mark.parametrize(("method", "path", "options"), ROUTES)
async def test_routes_need_a_token_with_the_inference_scope(
    client: httpx.AsyncClient, method: str, path: str, options: Callable[[], dict[str, Any]]
) -> None:
    anonymous = await client.request(method, path, headers={"Authorization": ""}, **options())
    assert anonymous.status_code == 401
    other = {"Authorization": f"Bearer {token(['tenant'], ['usage'])}"}
    assert (await client.request(method, path, headers=other, **options())).status_code == 403
    assert (await client.request(method, path, **options())).status_code == 200


async def test_health_is_public(client: httpx.AsyncClient) -> None:
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert (await client.get(path, headers={"Authorization": ""})).status_code == 200
