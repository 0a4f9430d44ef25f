"""Transaction models: aggregates looked up per formed batch, defaults when features fail."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from narthex.transactions import DEFAULTS, FEATURES, MODEL_FEATURES, Transaction, model_input
from tests.inference.test_app import serving
from tests.support.onnx_models import scorer_repository
from tests.support.scripted import Reply, ScriptedUpstream

# Not the defaults: the row made from these differs from the row made from the defaults.
KNOWN = {name: DEFAULTS[name] + 1.0 for name in FEATURES}

INSTANCE = {
    "account_id": "acct_1",
    "merchant_id": "m_9",
    "amount": 42.5,
    "currency": "EUR",
    "timestamp": 1_790_000_000.0,
    "channel": "online",
}


def batch_get_reply(entities: list[str]) -> Reply:
    body = {
        "schema": list(FEATURES),
        "as_of": 0,
        "features": [
            {"entity": e, "known": True, "values": KNOWN, "age_seconds": 3.0} for e in entities
        ],
    }
    return Reply(body=orjson.dumps(body))


def expected_score(values: dict[str, float]) -> float:
    tx = Transaction.from_dict({"event_id": "x", **INSTANCE})
    return float(np.float32(sum(np.asarray(model_input(tx, values), dtype=np.float32))))


@pytest.fixture
async def features() -> AsyncIterator[ScriptedUpstream]:
    async with ScriptedUpstream(batch_get_reply(["acct_1"])) as upstream:
        yield upstream


async def predict(client: httpx.AsyncClient, instances: list[Any]) -> httpx.Response:
    return await client.post("/v1/models/scorer/predict", json={"instances": instances})


async def test_aggregates_are_looked_up_with_the_callers_token(
    tmp_path: Path, features: ScriptedUpstream
) -> None:
    async with serving(scorer_repository(tmp_path), features_url=features.url) as (_, client):
        response = await predict(client, [INSTANCE])
        assert response.status_code == 200, response.text
        prediction = response.json()["predictions"][0]
        assert prediction["degraded"] is False
        assert math.isclose(prediction["score"], expected_score(KNOWN), rel_tol=1e-6)
        assert prediction["score"] != pytest.approx(expected_score(dict(DEFAULTS)))
    (call,) = features.requests
    assert call.path == "/internal/v1/features:batchGet"
    assert orjson.loads(call.body)["entities"] == ["acct_1"]
    assert call.headers["authorization"] == client.headers["authorization"]


async def test_one_lookup_per_formed_batch(tmp_path: Path, features: ScriptedUpstream) -> None:
    root = scorer_repository(tmp_path, max_queue_delay_ms=100)
    async with serving(root, features_url=features.url) as (_, client):
        responses = await asyncio.gather(*(predict(client, [INSTANCE]) for _ in range(20)))
        assert all(r.status_code == 200 for r in responses)
        metrics = (await client.get("/metrics")).text
    batches = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("inference_batch_size_count{")
    ]
    assert len(features.requests) == sum(batches) < 20


async def test_features_down_gives_defaults_marked_degraded_never_a_5xx(tmp_path: Path) -> None:
    async with ScriptedUpstream() as gone:
        url = gone.url  # a port that nothing listens on once this closes
    async with serving(scorer_repository(tmp_path), features_url=url) as (_, client):
        for _ in range(3):
            response = await predict(client, [INSTANCE, {**INSTANCE, "account_id": "acct_2"}])
            assert response.status_code == 200, response.text
            predictions = response.json()["predictions"]
            assert [p["degraded"] for p in predictions] == [True, True]
            assert predictions[0]["score"] == pytest.approx(expected_score(dict(DEFAULTS)))
        metrics = (await client.get("/metrics")).text
        fallbacks = {
            line.split('"')[1]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("inference_feature_fallbacks_total{")
        }
        # Connection refused, then (after breaker_fail_max failed tries) the open breaker.
        assert sum(fallbacks.values()) == 3
        assert set(fallbacks) <= {"unavailable", "breaker_open"}, fallbacks


async def test_a_bad_answer_from_features_also_degrades(tmp_path: Path) -> None:
    root = scorer_repository(tmp_path)
    async with (
        ScriptedUpstream(Reply(status=500, body=b"oops")) as broken,
        serving(root, features_url=broken.url) as (_, client),
    ):
        response = await predict(client, [INSTANCE])
        assert response.status_code == 200
        assert response.json()["predictions"][0]["degraded"] is True


async def test_inline_rows_need_no_lookup(tmp_path: Path, features: ScriptedUpstream) -> None:
    width = len(MODEL_FEATURES)
    async with serving(scorer_repository(tmp_path), features_url=features.url) as (_, client):
        response = await predict(client, [[0.5] * width])
        assert response.status_code == 200, response.text
        assert response.json()["predictions"] == [{"score": 0.5 * width}]
        assert (await predict(client, [[0.5] * 3])).status_code == 422
    assert features.requests == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"amount": -3}, "instances[0].amount"),
        ({"currency": "XXX"}, "instances[0].currency"),
        ({"merchant_id": None}, "instances[0].merchant_id"),
        ({"colour": "red"}, "instances[0].colour"),
    ],
)
async def test_a_bad_transaction_is_a_422_naming_the_field(
    tmp_path: Path, features: ScriptedUpstream, change: dict[str, Any], message: str
) -> None:
    async with serving(scorer_repository(tmp_path), features_url=features.url) as (_, client):
        response = await predict(client, [{**INSTANCE, **change}])
    assert response.status_code == 422
    assert message in response.json()["detail"]
    assert features.requests == []
