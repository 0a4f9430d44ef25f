"""A plan's allowed models, enforced at the edge: real auth, inference (fraud and minilm) and
gateway processes. A tenant whose plan allows only `fraud` gets 403 naming any other model,
on every route that names one (path or body), is charged nothing for it, and sees only
`fraud` in `GET /v1/models`; a tenant whose plan lists no models reaches them all."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.support.models import builtin_repository
from tests.support.platform import (
    Admin,
    Ledger,
    PlanNumbers,
    edge,
    exchange,
    inference_spec,
    running,
)

pytestmark = pytest.mark.slow

ONLY_FRAUD = PlanNumbers(rate=1000, burst=1000, allowed_models=("fraud",))
EVERY_MODEL = PlanNumbers(rate=1000, burst=1000)
PROBLEM_JSON = "application/problem+json"


@dataclass(frozen=True)
class Callers:
    restricted: httpx.Client
    unrestricted: httpx.Client


@pytest.fixture(scope="module")
def callers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callers]:
    directory = tmp_path_factory.mktemp("allowed")
    repository = builtin_repository(["fraud", "minilm"])
    with edge(directory) as platform:
        inference = inference_spec(
            "inference", platform.auth.url, repository, models="fraud,minilm"
        )
        with running([inference], directory) as (inference_service,):
            spec = platform.gateway("gateway", inference_url=inference_service.url)
            with running([spec], directory) as (gateway,):
                admin = Admin(gateway.url, platform.admin_key)
                try:
                    restricted = admin.create_tenant(
                        "only-fraud", admin.create_plan("only-fraud", ONLY_FRAUD)
                    )
                    unrestricted = admin.create_tenant(
                        "every-model", admin.create_plan("every-model", EVERY_MODEL)
                    )
                finally:
                    admin.close()
                clients = [
                    httpx.Client(
                        base_url=gateway.url,
                        headers={"Authorization": f"Bearer {exchange(gateway.url, t.key)}"},
                        timeout=30.0,
                    )
                    for t in (restricted, unrestricted)
                ]
                try:
                    yield Callers(*clients)
                finally:
                    for client in clients:
                        client.close()


def listed(client: httpx.Client) -> list[str]:
    response = client.get("/v1/models")
    assert response.status_code == 200, response.text
    return sorted(model["id"] for model in response.json()["data"])


def test_the_model_list_shows_only_what_the_plan_allows(callers: Callers) -> None:
    assert listed(callers.restricted) == ["fraud"]
    assert listed(callers.unrestricted) == ["fraud", "minilm"]
    assert callers.restricted.head("/v1/models").status_code < 500  # no list to filter


# Each route's refusal comes in the shape of the protocol it speaks.
REFUSED = [
    ("GET", "/v1/models/minilm", None, "openai"),
    ("POST", "/v1/models/minilm/predict", {"instances": ["a text"]}, "problem"),
    ("POST", "/v1/models/minilm/versions/1/predict", {"instances": ["a text"]}, "problem"),
    ("GET", "/v2/models/minilm", None, "oip"),
    ("GET", "/v2/models/minilm/ready", None, "oip"),
    (
        "POST",
        "/v2/models/minilm/infer",
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]}]},
        "oip",
    ),
    ("POST", "/v1/embeddings", {"model": "minilm", "input": ["a", "b"]}, "openai"),
    ("POST", "/v1/embeddings", {"model": "minilm:1", "input": "a"}, "openai"),
]


def refusal_message(response: httpx.Response, protocol: str) -> str:
    """The refusal's message, once its envelope is checked to be the protocol's."""
    if protocol == "problem":
        assert response.headers["content-type"] == PROBLEM_JSON
        problem = response.json()
        assert problem["type"].endswith("/model-not-allowed")
        assert problem["model"] == "minilm"
        return str(problem["detail"])
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    if protocol == "oip":
        assert set(body) == {"error"}
        return str(body["error"])
    assert body["error"]["type"] == "permission_error"
    assert body["error"]["code"] == "model_not_allowed"
    return str(body["error"]["message"])


@pytest.mark.parametrize(("method", "path", "body", "protocol"), REFUSED)
def test_another_model_is_403_naming_it_and_costs_nothing(
    callers: Callers, method: str, path: str, body: object, protocol: str
) -> None:
    client = callers.restricted
    ledger = Ledger(client)
    response = client.request(method, path, json=body)
    assert response.status_code == 403, response.text
    assert "'minilm'" in refusal_message(response, protocol)
    assert ledger.quota() == ledger.remaining  # refused before it was charged


def test_an_allowed_model_is_served(callers: Callers) -> None:
    client = callers.restricted
    assert client.get("/v1/models/fraud").status_code == 200
    assert client.get("/v2/models/fraud").status_code == 200
    assert client.get("/v2/models/fraud/ready").status_code == 200
    assert client.get("/v2").status_code == 200  # names no model


def test_an_empty_list_allows_every_model(callers: Callers) -> None:
    client = callers.unrestricted
    response = client.post("/v1/embeddings", json={"model": "minilm", "input": ["a", "b"]})
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 2
    assert client.get("/v2/models/minilm").status_code == 200
