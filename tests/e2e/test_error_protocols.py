"""Every error in its route's protocol: problem+json on narthex's own routes, `{"error": ...}`
under /v2 (the Open Inference Protocol), OpenAI's shape under /v1/embeddings. Real auth,
inference and gateway processes; each refusal is sent both to inference itself and through
the gateway, and must come back in the same shape whichever layer refused it (the token
check, the body cap, the route, the limiter)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.support.models import builtin_repository
from tests.support.platform import (
    Admin,
    PlanNumbers,
    Tenant,
    edge,
    exchange,
    inference_spec,
    running,
)

pytestmark = pytest.mark.slow

BODY_CAP = 64 << 10
TOO_LARGE = b"{" + b" " * (BODY_CAP + 1) + b"}"
# One token in the bucket, and (as good as) none after it: the second request is refused.
ONE_REQUEST = PlanNumbers(rate=0.001, burst=1)
PLENTY = PlanNumbers(rate=1000, burst=1000)
PROBLEM_BASE = "https://narthex.dev/problems/"
# What would say how narthex is built: a trace, an address, a module, a file.
INTERNAL = ("Traceback", "127.0.0.1", "narthex.common", "narthex.inference", ".py", "File ")


@dataclass(frozen=True)
class Case:
    """What one protocol's routes are asked: a route that exists, one that names no model,
    and a body that route refuses."""

    path: str
    body: dict[str, Any]
    missing_path: str
    missing_body: dict[str, Any]
    invalid_body: dict[str, Any]


CASES = {
    "problem": Case(
        "/v1/models/fraud/predict",
        {"instances": [{"transaction": {}}]},
        "/v1/models/nope/predict",
        {"instances": [{}]},
        {"instances": "not a list"},
    ),
    "oip": Case(
        "/v2/models/fraud/infer",
        {"inputs": []},
        "/v2/models/nope/infer",
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [0.0]}]},
        {"inputs": "not a list"},
    ),
    "openai": Case(
        "/v1/embeddings",
        {"model": "fraud", "input": "a"},
        "/v1/embeddings",
        {"model": "nope", "input": "a"},
        {"model": "fraud"},
    ),
}


@dataclass(frozen=True)
class Stack:
    inference: str
    gateway: str
    # Per protocol: a token with the inference scope, and one without it.
    tokens: dict[str, str]
    narrow_tokens: dict[str, str]
    # Per protocol: a tenant allowed one request, for the limiter's refusal.
    limited: dict[str, Tenant]


def narrowed(gateway: str, key: str) -> str:
    """A real token for `key` that carries only the `keys` scope."""
    response = httpx.post(
        gateway + "/v1/auth/token", headers={"X-API-Key": key}, data={"scope": "keys"}, timeout=10
    )
    response.raise_for_status()
    token: str = response.json()["access_token"]
    return token


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("errors")
    repository = builtin_repository(["fraud"])
    with edge(directory) as platform:
        inference = inference_spec(
            "inference", platform.auth.url, repository, models="fraud", max_body_bytes=str(BODY_CAP)
        )
        with running([inference], directory) as (inference_service,):
            spec = platform.gateway(
                "gateway", inference_url=inference_service.url, max_body_bytes=str(BODY_CAP)
            )
            with running([spec], directory) as (gateway,):
                admin = Admin(gateway.url, platform.admin_key)
                try:
                    plenty = admin.create_plan("errors", PLENTY)
                    one = admin.create_plan("errors-one", ONE_REQUEST)
                    tenants = {p: admin.create_tenant(f"errors-{p}", plenty) for p in CASES}
                    limited = {p: admin.create_tenant(f"limited-{p}", one) for p in CASES}
                finally:
                    admin.close()
                yield Stack(
                    inference_service.url,
                    gateway.url,
                    {p: exchange(gateway.url, t.key) for p, t in tenants.items()},
                    {p: narrowed(gateway.url, t.key) for p, t in tenants.items()},
                    limited,
                )


def check_shape(response: httpx.Response, protocol: str, status: int) -> None:
    """`response` is a refusal with `status` in `protocol`'s envelope, and says nothing of
    how narthex is built."""
    # Neither protocol has a 422: bad input is a 400 in both.
    expected = 400 if status == 422 and protocol != "problem" else status
    assert response.status_code == expected, response.text
    text = response.text
    for internal in INTERNAL:
        assert internal not in text, text
    body = response.json()
    if protocol == "problem":
        assert response.headers["content-type"] == "application/problem+json"
        assert body["status"] == expected
        assert body["type"].startswith(PROBLEM_BASE)
        assert body["title"]
        assert body["request_id"] == response.headers["x-request-id"]
        return
    assert response.headers["content-type"] == "application/json"
    if protocol == "oip":
        assert set(body) == {"error"}
        assert isinstance(body["error"], str)
        assert body["error"]
        return
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert isinstance(error["type"], str)
    assert body["request_id"] == response.headers["x-request-id"]


@pytest.mark.parametrize("via", ["inference", "gateway"])
@pytest.mark.parametrize("protocol", list(CASES))
def test_every_refusal_on_a_route_speaks_its_protocol(
    stack: Stack, protocol: str, via: str
) -> None:
    case = CASES[protocol]
    base = stack.inference if via == "inference" else stack.gateway
    token = {"Authorization": f"Bearer {stack.tokens[protocol]}"}
    with httpx.Client(base_url=base, timeout=30.0) as client:
        check_shape(client.post(case.path, json=case.body), protocol, 401)
        check_shape(
            client.post(case.path, json=case.body, headers={"Authorization": "Bearer nonsense"}),
            protocol,
            401,
        )
        narrow = {"Authorization": f"Bearer {stack.narrow_tokens[protocol]}"}
        check_shape(client.post(case.path, json=case.body, headers=narrow), protocol, 403)
        check_shape(
            client.post(case.missing_path, json=case.missing_body, headers=token), protocol, 404
        )
        too_large = {**token, "Content-Type": "application/json"}
        check_shape(client.post(case.path, content=TOO_LARGE, headers=too_large), protocol, 413)
        check_shape(client.post(case.path, json=case.invalid_body, headers=token), protocol, 422)


@pytest.mark.parametrize("protocol", list(CASES))
def test_the_edge_refusals_speak_the_protocol_of_the_route(stack: Stack, protocol: str) -> None:
    """What only the gateway refuses: a coding it does not offer, a tenant past its limit."""
    case = CASES[protocol]
    with httpx.Client(base_url=stack.gateway, timeout=30.0) as client:
        token = {"Authorization": f"Bearer {stack.tokens[protocol]}"}
        unknown_coding = {**token, "Content-Type": "application/json", "Content-Encoding": "br"}
        check_shape(client.post(case.path, content=b"{}", headers=unknown_coding), protocol, 415)
        limited = stack.limited[protocol].headers
        client.post(case.path, json=case.body, headers=limited)  # the one request allowed
        refused = client.post(case.path, json=case.body, headers=limited)
        check_shape(refused, protocol, 429)
        assert int(refused.headers["retry-after"]) >= 1
