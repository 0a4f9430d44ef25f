"""The official clients, unchanged, against the running service and the built-in models:
`tritonclient.http` (binary and JSON) and `openai` (direct, and through the gateway)."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from openai import BadRequestError, OpenAI

from narthex.inference.builtin import fraud
from tests.support.models import builtin_repository
from tests.support.platform import edge, exchange, gateway_spec, inference_spec, running
from tests.support.services import Service

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Served:
    inference: Service
    gateway: Service
    jwt: str
    api_key: str
    repository: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.jwt}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    repository = builtin_repository()
    directory = tmp_path_factory.mktemp("clients")
    with edge(directory) as platform:
        spec = inference_spec("inference", platform.auth.url, repository)
        with running([spec], directory) as (inference,):
            gateway = gateway_spec("gateway", platform.auth.url, inference.url)
            with running([gateway], directory) as (gw,):
                yield Served(
                    inference,
                    gw,
                    exchange(platform.auth.url, platform.admin_key),
                    platform.admin_key,
                    repository,
                )


@pytest.fixture(scope="module")
def training() -> fraud.Training:
    """The same deterministic training the build ran: sklearn's answers to compare with."""
    return fraud.train()


@pytest.fixture
def client(served: Served) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=served.inference.url.removeprefix("http://"))
    try:
        yield client
    finally:
        client.close()


def reference(served: Served) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(
        (served.repository / "minilm" / "1" / "reference.json").read_bytes()
    )
    return data


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("version", [1, 2])
def test_tritonclient_fraud_matches_sklearn(
    served: Served,
    client: triton.InferenceServerClient,
    training: fraud.Training,
    binary: bool,
    version: int,
) -> None:
    rows = training.holdout.inputs[:100].astype(np.float32)
    features = triton.InferInput("features", list(rows.shape), "FP32")
    features.set_data_from_numpy(rows, binary_data=binary)
    result = client.infer(
        "fraud",
        [features],
        model_version=str(version),
        outputs=[triton.InferRequestedOutput("probabilities", binary_data=binary)],
        headers=served.headers,
    )
    assert result.get_response()["model_version"] == str(version)
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (100, 2)
    expected = training.fraud_probability(version, training.holdout.inputs[:100])
    np.testing.assert_allclose(probabilities[:, 1], expected, atol=1e-5)


def test_tritonclient_server_and_model_metadata(
    served: Served, client: triton.InferenceServerClient
) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("fraud", headers=served.headers)
    metadata = client.get_model_metadata("fraud", headers=served.headers)
    assert metadata["versions"] == ["1", "2"]
    assert metadata["inputs"][0]["name"] == "features"
    text = client.get_model_metadata("minilm", headers=served.headers)
    assert text["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert text["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]
    with pytest.raises(triton.InferenceServerException):
        client.get_model_metadata("fraud")  # no token


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_minilm_matches_pytorch(
    served: Served, client: triton.InferenceServerClient, binary: bool
) -> None:
    ref = reference(served)
    texts = np.array([t.encode() for t in ref["texts"]], dtype=np.object_)
    text = triton.InferInput("text", [len(texts)], "BYTES")
    text.set_data_from_numpy(texts, binary_data=binary)
    result = client.infer("minilm", [text], headers=served.headers)
    vectors = result.as_numpy("embedding")
    expected = np.asarray(ref["embeddings"], dtype=np.float32)
    cosine = (vectors * expected).sum(axis=1) / (
        np.linalg.norm(vectors, axis=1) * np.linalg.norm(expected, axis=1)
    )
    assert cosine.min() > 0.999


def test_openai_client_embeddings_match_pytorch(served: Served) -> None:
    ref = reference(served)
    with OpenAI(base_url=served.inference.url + "/v1", api_key=served.jwt, max_retries=0) as client:
        check_embeddings(client, ref)


def check_embeddings(client: OpenAI, ref: dict[str, Any]) -> None:
    expected = np.asarray(ref["embeddings"], dtype=np.float32)
    # Unasked, the client requests base64 and decodes it itself; asked for base64, it hands
    # the strings over as they came; asked for floats, it gets lists.
    for encoding in (None, "base64", "float"):
        options: dict[str, Any] = {} if encoding is None else {"encoding_format": encoding}
        response = client.embeddings.create(model="minilm", input=ref["texts"], **options)
        vectors = np.asarray(
            [
                np.frombuffer(base64.b64decode(d.embedding), dtype="<f4")
                if isinstance(d.embedding, str)
                else d.embedding
                for d in response.data
            ],
            dtype=np.float32,
        )
        assert vectors.shape == expected.shape, encoding
        assert np.abs(vectors - expected).max() < 1e-3
        cosine = (vectors * expected).sum(axis=1)  # both L2-normalised
        assert cosine.min() > 0.999
        assert response.model == "minilm:1"
        assert response.usage.prompt_tokens > len(ref["texts"]) * 2


def test_openai_client_through_the_gateway_with_an_api_key(served: Served) -> None:
    with OpenAI(
        base_url=served.gateway.url + "/v1", api_key=served.api_key, max_retries=0
    ) as client:
        response = client.embeddings.create(model="minilm", input="hello narthex")
        assert len(response.data[0].embedding) == 384
        assert response.usage.total_tokens == response.usage.prompt_tokens > 2
        with pytest.raises(BadRequestError) as refused:
            client.embeddings.create(model="minilm", input=[""])
    assert "empty" in str(refused.value)


async def test_swapping_frauds_default_under_32_clients_fails_nothing(
    served: Served, training: fraud.Training
) -> None:
    rows = training.holdout.inputs[:32].astype(np.float32)
    expected = {v: training.fraud_probability(v, training.holdout.inputs[:32]) for v in (1, 2)}
    answered: list[tuple[float, float, str]] = []  # (sent, received, version)
    failures: list[str] = []
    stop = asyncio.Event()

    async def caller(http: httpx.AsyncClient, i: int) -> None:
        payload = {"instances": [rows[i].tolist()]}
        while not stop.is_set():
            sent = time.monotonic()
            response = await http.post("/v1/models/fraud/predict", json=payload)
            if response.status_code != 200:
                failures.append(f"{response.status_code} {response.text[:200]}")
                continue
            body = response.json()
            version = int(body["version"])
            # The answer is the named version's own.
            probability = body["predictions"][0]["probabilities"][1]
            assert abs(probability - expected[version][i]) < 1e-5
            answered.append((sent, time.monotonic(), body["version"]))

    async with httpx.AsyncClient(
        base_url=served.inference.url, headers=served.headers, timeout=10
    ) as http:
        callers = [asyncio.create_task(caller(http, i)) for i in range(32)]
        try:
            await asyncio.sleep(1.0)
            swap_sent = time.monotonic()
            swap = await http.put("/v1/admin/models/fraud/default", json={"version": 1})
            assert swap.status_code == 200, swap.text
            swapped = time.monotonic()
            await asyncio.sleep(1.0)
        finally:
            stop.set()
            await asyncio.gather(*callers)
            restore = await http.put("/v1/admin/models/fraud/default", json={"version": 2})
            assert restore.status_code == 200
    assert failures == []
    # Judged by cause, not by a grace period: an answer received before the swap was sent
    # was resolved before it, and a request sent after the swap's answer arrives after it.
    # (A request queued behind a slow batch may be answered well after the swap, on the
    # version it was resolved to.)
    before = {v for _, received, v in answered if received < swap_sent}
    after = {v for sent, _, v in answered if sent > swapped}
    assert before == {"2"}
    assert after == {"1"}


async def test_clients_that_hang_up_mid_request_do_not_break_the_others(served: Served) -> None:
    texts = [f"text number {i} about fraud and embeddings" for i in range(64)]

    async def embed(http: httpx.AsyncClient, text: str) -> httpx.Response:
        return await http.post("/v1/embeddings", json={"model": "minilm", "input": text})

    # One connection per client, so that a cancelled request closes its own socket.
    clients = [
        httpx.AsyncClient(base_url=served.inference.url, headers=served.headers, timeout=30)
        for _ in texts
    ]
    try:
        calls = [
            asyncio.create_task(embed(http, text))
            for http, text in zip(clients, texts, strict=True)
        ]
        await asyncio.sleep(0.05)  # sent, queued or computing
        for call in calls[::2]:
            call.cancel()
        results = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        for http in clients:
            await http.aclose()
    kept = [r for r in results[1::2] if isinstance(r, httpx.Response)]
    assert len(kept) == 32, results[1::2]
    assert all(r.status_code == 200 for r in kept), [r.text[:200] for r in kept]
    assert all(len(r.json()["data"][0]["embedding"]) == 384 for r in kept)
    # And the service is healthy for whoever comes next.
    async with httpx.AsyncClient(
        base_url=served.inference.url, headers=served.headers, timeout=30
    ) as http:
        after = await embed(http, "after the hang-ups")
        assert after.status_code == 200
