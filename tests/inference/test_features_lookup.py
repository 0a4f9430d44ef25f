"""Transaction models: aggregates looked up per formed batch, each account under its own
tenant, with inference's own credential; defaults when features (or the credential) fail."""

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
from pydantic import SecretStr

from narthex.transactions import DEFAULTS, FEATURES, MODEL_FEATURES, Transaction, model_input
from narthex.transactions.lookup import Answer, encode_answer
from tests.inference.test_app import serving
from tests.support.onnx_models import scorer_repository
from tests.support.scripted import Reply, ScriptedUpstream
from tests.support.tokens import bearer

# Not the defaults: the row made from these differs from the row made from the defaults.
KNOWN = {name: DEFAULTS[name] + 1.0 for name in FEATURES}
# What the scripted auth service answers inference's key with (opaque to inference).
SERVICE_TOKEN = "inference.service.token"
SERVICE_KEY = "nx_test_inferencekey_secret"
# The test tokens' tenant (tests.support.tokens), and another one.
TENANT = "t_acme"

INSTANCE = {
    "account_id": "acct_1",
    "merchant_id": "m_9",
    "amount": 42.5,
    "currency": "EUR",
    "timestamp": 1_790_000_000.0,
    "channel": "online",
}


def batch_get_reply(entities: list[tuple[str, str]], values: list[dict[str, float]]) -> Reply:
    answers = [Answer(t, a, True, v, 3.0) for (t, a), v in zip(entities, values, strict=True)]
    return Reply(body=encode_answer(0.0, answers))


def token_reply(token: str = SERVICE_TOKEN) -> Reply:
    body = {"access_token": token, "token_type": "Bearer", "expires_in": 900, "scope": "x"}
    return Reply(body=orjson.dumps(body))


def expected_score(values: dict[str, float]) -> float:
    tx = Transaction.from_dict({"event_id": "x", **INSTANCE})
    return float(np.float32(sum(np.asarray(model_input(tx, values), dtype=np.float32))))


@pytest.fixture
async def features() -> AsyncIterator[ScriptedUpstream]:
    async with ScriptedUpstream(batch_get_reply([(TENANT, "acct_1")], [KNOWN])) as upstream:
        yield upstream


@pytest.fixture
async def auth() -> AsyncIterator[ScriptedUpstream]:
    async with ScriptedUpstream(token_reply()) as upstream:
        yield upstream


def settings(features: ScriptedUpstream, auth: ScriptedUpstream | None) -> dict[str, Any]:
    """Inference looking features up at `features`, its own key exchanged at `auth`."""
    if auth is None:
        return {"features_url": features.url}
    return {"features_url": features.url, "auth_url": auth.url, "service_key": SECRET}


SECRET = SecretStr(SERVICE_KEY)


async def predict(
    client: httpx.AsyncClient, instances: list[Any], headers: dict[str, str] | None = None
) -> httpx.Response:
    return await client.post(
        "/v1/models/scorer/predict", json={"instances": instances}, headers=headers
    )


async def test_aggregates_are_looked_up_under_the_callers_tenant_with_inferences_own_token(
    tmp_path: Path, features: ScriptedUpstream, auth: ScriptedUpstream
) -> None:
    async with serving(scorer_repository(tmp_path), **settings(features, auth)) as (_, client):
        response = await predict(client, [INSTANCE])
        assert response.status_code == 200, response.text
        prediction = response.json()["predictions"][0]
        assert prediction["degraded"] is False
        assert math.isclose(prediction["score"], expected_score(KNOWN), rel_tol=1e-6)
        assert prediction["score"] != pytest.approx(expected_score(dict(DEFAULTS)))
    (call,) = features.requests
    assert call.path == "/internal/v1/features:batchGet"
    assert orjson.loads(call.body)["entities"] == [{"tenant": TENANT, "account": "acct_1"}]
    # Inference's own token, never the caller's (which speaks for one tenant only).
    assert call.headers["authorization"] == f"Bearer {SERVICE_TOKEN}"
    assert call.headers["authorization"] != client.headers["authorization"]
    (exchange,) = auth.requests
    assert (exchange.method, exchange.path) == ("POST", "/v1/auth/token")
    assert exchange.headers["x-api-key"] == SERVICE_KEY


async def test_a_formed_batch_mixing_tenants_looks_each_account_up_under_its_own_tenant(
    tmp_path: Path, auth: ScriptedUpstream
) -> None:
    mine, theirs = KNOWN, {name: DEFAULTS[name] + 3.0 for name in FEATURES}
    entities = [(TENANT, "acct_1"), ("t_other", "acct_1")]
    other = bearer(["tenant"], ["inference"], subject="t_other")
    root = scorer_repository(tmp_path, max_queue_delay_ms=100)
    async with (
        ScriptedUpstream(batch_get_reply(entities, [mine, theirs])) as features,
        serving(root, **settings(features, auth)) as (_, client),
    ):
        # Interleaved, at once: the batcher forms batches holding both tenants' requests.
        responses = await asyncio.gather(
            *(predict(client, [INSTANCE], None if i % 2 else other) for i in range(12))
        )
    asked = [orjson.loads(call.body)["entities"] for call in features.requests]
    mixed = [a for a in asked if len(a) == 2]
    assert mixed, f"no batch held both tenants: {asked}"
    for entities_asked in mixed:
        assert sorted((e["tenant"], e["account"]) for e in entities_asked) == sorted(entities)
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        (prediction,) = response.json()["predictions"]
        assert prediction["degraded"] is False
        expected = expected_score(mine if i % 2 else theirs)
        assert math.isclose(prediction["score"], expected, rel_tol=1e-6), i


async def test_without_a_service_key_lookups_degrade_and_features_is_not_called(
    tmp_path: Path, features: ScriptedUpstream
) -> None:
    async with serving(scorer_repository(tmp_path), **settings(features, None)) as (_, client):
        response = await predict(client, [INSTANCE])
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["degraded"] is True
        assert fallback_reasons((await client.get("/metrics")).text) == {"no_credential": 1.0}
    assert features.requests == []


async def test_auth_down_degrades_and_features_is_not_called(
    tmp_path: Path, features: ScriptedUpstream
) -> None:
    async with ScriptedUpstream() as gone:
        url = gone.url  # a port that nothing listens on once this closes
    config = {**settings(features, None), "auth_url": url, "service_key": SECRET}
    async with serving(scorer_repository(tmp_path), **config) as (_, client):
        for _ in range(2):
            response = await predict(client, [INSTANCE])
            assert response.status_code == 200, response.text
            assert response.json()["predictions"][0]["degraded"] is True
        assert fallback_reasons((await client.get("/metrics")).text) == {"no_credential": 2.0}
    assert features.requests == []


async def test_a_refused_credential_degrades_and_a_new_token_is_fetched(
    tmp_path: Path, auth: ScriptedUpstream
) -> None:
    async with (
        ScriptedUpstream(Reply(status=403, body=b"{}")) as refusing,
        serving(scorer_repository(tmp_path), **settings(refusing, auth)) as (_, client),
    ):
        for _ in range(2):
            response = await predict(client, [INSTANCE])
            assert response.status_code == 200, response.text
            assert response.json()["predictions"][0]["degraded"] is True
        assert fallback_reasons((await client.get("/metrics")).text) == {"refused": 2.0}
    # The refused token was dropped: each lookup exchanged the key again.
    assert len(auth.requests) == len(refusing.requests) == 2


def fallback_reasons(metrics: str) -> dict[str, float]:
    return {
        line.split('"')[1]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("inference_feature_fallbacks_total{")
    }


async def test_one_lookup_per_formed_batch(
    tmp_path: Path, features: ScriptedUpstream, auth: ScriptedUpstream
) -> None:
    root = scorer_repository(tmp_path, max_queue_delay_ms=100)
    async with serving(root, **settings(features, auth)) as (_, client):
        responses = await asyncio.gather(*(predict(client, [INSTANCE]) for _ in range(20)))
        assert all(r.status_code == 200 for r in responses)
        metrics = (await client.get("/metrics")).text
    batches = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("inference_batch_size_count{")
    ]
    assert len(features.requests) == sum(batches) < 20


async def test_features_down_gives_defaults_marked_degraded_never_a_5xx(
    tmp_path: Path, auth: ScriptedUpstream
) -> None:
    async with ScriptedUpstream() as gone:
        url = gone.url  # a port that nothing listens on once this closes
    config = {"features_url": url, "auth_url": auth.url, "service_key": SECRET}
    async with serving(scorer_repository(tmp_path), **config) as (_, client):
        for _ in range(3):
            response = await predict(client, [INSTANCE, {**INSTANCE, "account_id": "acct_2"}])
            assert response.status_code == 200, response.text
            predictions = response.json()["predictions"]
            assert [p["degraded"] for p in predictions] == [True, True]
            assert predictions[0]["score"] == pytest.approx(expected_score(dict(DEFAULTS)))
        fallbacks = fallback_reasons((await client.get("/metrics")).text)
        # Connection refused, then (after breaker_fail_max failed tries) the open breaker.
        assert sum(fallbacks.values()) == 3
        assert set(fallbacks) <= {"unavailable", "breaker_open"}, fallbacks


async def test_a_bad_answer_from_features_also_degrades(
    tmp_path: Path, auth: ScriptedUpstream
) -> None:
    root = scorer_repository(tmp_path)
    async with (
        ScriptedUpstream(Reply(status=500, body=b"oops")) as broken,
        serving(root, **settings(broken, auth)) as (_, client),
    ):
        response = await predict(client, [INSTANCE])
        assert response.status_code == 200
        assert response.json()["predictions"][0]["degraded"] is True


async def test_inline_rows_need_no_lookup(tmp_path: Path, features: ScriptedUpstream) -> None:
    width = len(MODEL_FEATURES)
    async with serving(scorer_repository(tmp_path), **settings(features, None)) as (_, client):
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
    async with serving(scorer_repository(tmp_path), **settings(features, None)) as (_, client):
        response = await predict(client, [{**INSTANCE, **change}])
    assert response.status_code == 422
    assert message in response.json()["detail"]
    assert features.requests == []
