"""The model-level canary with real processes: auth, inference serving a split from its
config.yaml, a gateway in front. Proportions over 10,000 requests, weights changed under 32
clients, sticky keys, pinned versions, bad weights, and who may change a split."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from narthex.testing.flood import inference_behind_gateway
from tests.support.onnx_models import tiny_repository
from tests.support.platform import (
    Admin,
    PlanNumbers,
    Tenant,
    exchange,
)
from tests.support.services import Service

pytestmark = pytest.mark.slow

MODEL = "affine"
TRAFFIC = f"/v1/admin/models/{MODEL}/traffic"
PREDICT = f"/v1/models/{MODEL}/predict"
VERSION_HEADER = "x-narthex-model-version"
KEY_HEADER = "x-narthex-canary-key"
# affine v1 is x*2+1, v2 is x*3+1: on [1, 1, 1] their totals tell which version computed.
ONE_ROW = orjson.dumps({"instances": [[1, 1, 1]]})
TOTALS = {"1": 9.0, "2": 12.0}
CLIENTS = 32
PLAN = PlanNumbers(rate=100_000.0, burst=1_000_000, daily_quota=2_000_000_000)


@dataclass(frozen=True)
class Stack:
    auth: Service
    inference: Service
    gateway: Service
    admin_key: str
    admin_jwt: str
    tenants: tuple[Tenant, Tenant]
    jwts: Mapping[str, str]  # tenant id -> JWT, for calling inference directly
    started_with: Any  # the split as inference started: from config.yaml

    def bearer(self, tenant: Tenant) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.jwts[tenant.id]}"}

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_jwt}"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("canary")
    # The split inference starts with comes from config.yaml.
    repository = tiny_repository(directory / "models", traffic={1: 90, 2: 10})
    with inference_behind_gateway(directory, repository, MODEL) as (platform, inference, gateway):
        admin = Admin(gateway.url, platform.admin_key)
        try:
            plan = admin.create_plan("canary", PLAN)
            tenants = (admin.create_tenant("canary-a", plan), admin.create_tenant("canary-b", plan))
        finally:
            admin.close()
        admin_jwt = exchange(platform.auth.url, platform.admin_key)
        response = httpx.get(
            inference.url + TRAFFIC, headers={"Authorization": f"Bearer {admin_jwt}"}
        )
        yield Stack(
            platform.auth,
            inference,
            gateway,
            platform.admin_key,
            admin_jwt,
            tenants,
            {t.id: exchange(platform.auth.url, t.key) for t in tenants},
            response.json(),
        )


def weights_of(stack: Stack) -> dict[str, int] | None:
    response = httpx.get(stack.inference.url + TRAFFIC, headers=stack.admin)
    assert response.status_code == 200, response.text
    weights: dict[str, int] | None = response.json()["weights"]
    return weights


def set_weights(stack: Stack, weights: dict[str, int]) -> None:
    response = httpx.put(
        stack.inference.url + TRAFFIC, headers=stack.admin, json={"weights": weights}
    )
    assert response.status_code == 200, response.text
    assert response.json()["weights"] == weights


def served_by(status: int, headers: Mapping[str, str], body: bytes) -> str:
    """The version that answered a predict, checked three ways: the body names it, the
    header names the same, and the numbers are that version's."""
    assert status == 200, body[:500]
    answer = orjson.loads(body)
    version: str = answer["version"]
    assert headers[VERSION_HEADER] == version
    assert answer["predictions"][0]["total"] == TOTALS[version]
    return version


async def send_all(
    url: str, requests: list[dict[str, str]], *, clients: int = CLIENTS, body: bytes = ONE_ROW
) -> tuple[list[str], list[str]]:
    """Each request (its headers) once, by `clients` concurrent clients; the version that
    served each, in request order, and the failures."""
    versions = [""] * len(requests)
    failures: list[str] = []
    queue = iter(range(len(requests)))
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def client() -> None:
            for index in queue:
                headers = {"Content-Type": "application/json", **requests[index]}
                async with session.post(url, data=body, headers=headers) as response:
                    content = await response.read()
                    if response.status != 200:
                        failures.append(f"{response.status}: {content[:200]!r}")
                        continue
                    versions[index] = served_by(response.status, response.headers, content)

        await asyncio.gather(*(client() for _ in range(clients)))
    return versions, failures


def metric(stack: Stack, name: str, **labels: str) -> float:
    text = httpx.get(stack.inference.url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no {name} {labels}")


# -- proportions -----------------------------------------------------------------------------


def test_ten_thousand_requests_at_90_10_land_on_the_weights(stack: Stack) -> None:
    assert stack.started_with["weights"] == {"1": 90, "2": 10}  # from config.yaml
    set_weights(stack, {"1": 90, "2": 10})  # each tenant's round robin starts afresh
    assert metric(stack, "inference_traffic_weight", model=MODEL, version="2") == 10
    before = {
        v: metric(stack, "inference_requests_total", model=MODEL, version=v, outcome="ok")
        for v in ("1", "2")
    }
    tenant = stack.tenants[0]
    versions, failures = asyncio.run(
        send_all(stack.inference.url + PREDICT, [stack.bearer(tenant)] * 10_000)
    )
    assert failures == []
    counts = Counter(versions)
    assert abs(counts["2"] / 10_000 - 0.10) <= 0.015
    assert abs(counts["1"] / 10_000 - 0.90) <= 0.015
    # Smooth weighted round robin per tenant: not only close, exact.
    assert counts == {"1": 9000, "2": 1000}
    after = {
        v: metric(stack, "inference_requests_total", model=MODEL, version=v, outcome="ok")
        for v in ("1", "2")
    }
    assert {v: after[v] - before[v] for v in after} == {"1": 9000, "2": 1000}


def test_one_tenants_flood_does_not_change_another_tenants_split(stack: Stack) -> None:
    set_weights(stack, {"1": 90, "2": 10})
    noisy, quiet = stack.tenants
    url = stack.inference.url + PREDICT

    async def both() -> tuple[list[str], list[str]]:
        flood = asyncio.create_task(send_all(url, [stack.bearer(noisy)] * 2000))
        seen: list[str] = []
        headers = {**stack.bearer(quiet), "Content-Type": "application/json"}
        async with httpx.AsyncClient(headers=headers) as client:
            for _ in range(20):  # one at a time, among the flood
                response = await client.post(url, content=ONE_ROW)
                seen.append(served_by(response.status_code, response.headers, response.content))
        _, failures = await flood
        return seen, failures

    seen, failures = asyncio.run(both())
    assert failures == []
    assert seen.count("2") == 2  # exactly its own 10%, whatever the other tenant sends


# -- changing weights under load ---------------------------------------------------------------

CHANGES: list[dict[str, int] | None] = [
    {"1": 90, "2": 10},
    {"1": 50, "2": 50},
    {"1": 0, "2": 100},
    {"2": 100},
    {"1": 100},
    None,  # back to the default
    {"1": 75, "2": 25},
]


def test_changing_weights_under_32_clients_fails_nothing(stack: Stack) -> None:
    url = stack.inference.url
    rounds = 10
    served = 0
    changes_done = 0
    done = asyncio.Event()
    answered = asyncio.Event()

    async def change(client: httpx.AsyncClient) -> None:
        nonlocal changes_done
        mark = 0
        try:
            for weights in CHANGES * rounds:
                while served < mark:  # some answers between one change and the next
                    answered.clear()
                    await answered.wait()
                if weights is None:
                    response = await client.delete(TRAFFIC)
                else:
                    response = await client.put(TRAFFIC, json={"weights": weights})
                assert response.status_code == 200, response.text
                changes_done += 1
                mark = served + 25
        finally:
            done.set()  # the clients stop, whatever happened here

    async def clients() -> tuple[Counter[str], list[str]]:
        versions: Counter[str] = Counter()
        failures: list[str] = []
        protocols = [
            (PREDICT, ONE_ROW, {}),
            (PREDICT, ONE_ROW, {KEY_HEADER: "sticky-user"}),
            (f"/v2/models/{MODEL}/infer", OIP_ONE_ROW, {}),
        ]
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def one(number: int) -> None:
                nonlocal served
                tenant = stack.tenants[number % 2]
                path, body, extra = protocols[number % len(protocols)]
                headers = {"Content-Type": "application/json", **stack.bearer(tenant), **extra}
                while not done.is_set():
                    async with session.post(url + path, data=body, headers=headers) as response:
                        content = await response.read()
                        if response.status != 200:
                            failures.append(f"{response.status} {path}: {content[:200]!r}")
                        else:
                            versions[oip_or_v1_version(path, response.headers, content)] += 1
                        served += 1
                        answered.set()

            await asyncio.gather(*(one(n) for n in range(CLIENTS)))
        return versions, failures

    async def run() -> tuple[Counter[str], list[str]]:
        async with httpx.AsyncClient(base_url=url, headers=stack.admin, timeout=30) as admin:
            changer = asyncio.create_task(change(admin))
            try:
                return await clients()
            finally:
                await changer

    versions, failures = asyncio.run(run())
    assert failures == []
    assert changes_done == len(CHANGES) * rounds
    assert set(versions) == {"1", "2"}
    assert weights_of(stack) == {"1": 75, "2": 25}


OIP_ONE_ROW = orjson.dumps(
    {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 1, 1]}]}
)


def oip_or_v1_version(path: str, headers: Mapping[str, str], body: bytes) -> str:
    if path.startswith("/v2/"):
        answer = orjson.loads(body)
        version: str = answer["model_version"]
        assert headers[VERSION_HEADER] == version
        total = next(o for o in answer["outputs"] if o["name"] == "total")
        assert total["data"] == [TOTALS[version]]
        return version
    return served_by(200, headers, body)


# -- sticky keys and pins -----------------------------------------------------------------------


def test_sticky_keys_hold_and_a_pinned_version_wins(stack: Stack) -> None:
    set_weights(stack, {"1": 50, "2": 50})
    a, b = stack.tenants
    keys = [f"user-{i}" for i in range(300)]
    url = stack.inference.url + PREDICT
    first, failures = asyncio.run(send_all(url, [{**stack.bearer(a), KEY_HEADER: k} for k in keys]))
    again, more = asyncio.run(send_all(url, [{**stack.bearer(b), KEY_HEADER: k} for k in keys]))
    assert failures == more == []
    assert first == again  # the same key, the same version, whichever tenant asks
    assert set(first) == {"1", "2"}
    # Through the gateway too: the key goes up, the version header comes back.
    json = {"Content-Type": "application/json"}
    with httpx.Client(base_url=stack.gateway.url, headers={**a.headers, **json}) as client:
        for key, version in list(zip(keys, first, strict=True))[:20]:
            response = client.post(PREDICT, content=ONE_ROW, headers={KEY_HEADER: key})
            assert served_by(response.status_code, response.headers, response.content) == version
        # A pinned version wins over the split and over a key that hashes elsewhere.
        on_two = next(k for k, v in zip(keys, first, strict=True) if v == "2")
        for pinned in ("1", "2"):
            for headers in ({}, {KEY_HEADER: on_two}):
                response = client.post(
                    f"/v1/models/{MODEL}/versions/{pinned}/predict",
                    content=ONE_ROW,
                    headers=headers,
                )
                assert served_by(response.status_code, response.headers, response.content) == pinned
                response = client.post(
                    f"/v2/models/{MODEL}/versions/{pinned}/infer",
                    content=OIP_ONE_ROW,
                    headers=headers,
                )
                path = f"/v2/models/{MODEL}/versions/{pinned}/infer"
                assert oip_or_v1_version(path, response.headers, response.content) == pinned
    set_weights(stack, {"1": 0, "2": 100})
    versions, failures = asyncio.run(send_all(url, [stack.bearer(a)] * 50))
    assert failures == []
    assert set(versions) == {"2"}  # a zero weight takes nothing


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"weights": {"1": 90, "2": 20}}, "sum to 110"),
        ({"weights": {"1": 110, "2": -10}}, "not a non-negative integer"),
        ({"weights": {"1": 90, "7": 10}}, "v7 not loaded"),
        ({"weights": {}}, "at least one version"),
        ({"weights": {"1": "90", "2": 10}}, "weights.1"),
        ({"weights": {"1": 89.5, "2": 10.5}}, "weights.1"),
        ({"weights": {"one": 100}}, "weights.one"),
        ({"weights": {"1": 100}, "sticky": True}, "sticky"),
        ([90, 10], "valid dictionary"),
    ],
)
def test_bad_weights_are_a_422_that_changes_nothing(stack: Stack, body: Any, says: str) -> None:
    set_weights(stack, {"1": 80, "2": 20})
    for base, headers in (
        (stack.inference.url, stack.admin),
        (stack.gateway.url, {"X-API-Key": stack.admin_key}),
    ):
        response = httpx.put(base + TRAFFIC, headers=headers, json=body)
        assert response.status_code == 422, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert says in response.json()["detail"]
        assert weights_of(stack) == {"1": 80, "2": 20}
    response = httpx.put(
        stack.inference.url + "/v1/admin/models/nope/traffic",
        headers=stack.admin,
        json={"weights": {"1": 100}},
    )
    assert response.status_code == 404


def test_a_version_with_traffic_is_not_unloaded(stack: Stack) -> None:
    set_weights(stack, {"1": 90, "2": 10})
    unload = f"{stack.inference.url}/v1/admin/models/{MODEL}/versions/1/unload"
    response = httpx.post(unload, headers=stack.admin)
    assert response.status_code == 409, response.text
    assert "takes 90%" in response.json()["detail"]
    set_weights(stack, {"1": 0, "2": 100})
    # v1 (weight 0) can go; the default is v2 (the newest), so it is not the default either.
    response = httpx.post(unload, headers=stack.admin, timeout=30)
    assert response.status_code == 200, response.text
    assert weights_of(stack) == {"2": 100}
    load = f"{stack.inference.url}/v1/admin/models/{MODEL}/versions/1/load"
    assert httpx.post(load, headers=stack.admin, timeout=30).status_code == 200
    set_weights(stack, {"1": 90, "2": 10})


def test_only_an_admin_changes_a_split(stack: Stack) -> None:
    set_weights(stack, {"1": 90, "2": 10})
    tenant = stack.tenants[0]
    attempts = [
        (stack.inference.url, stack.bearer(tenant)),  # its JWT, straight to inference
        (stack.gateway.url, tenant.headers),  # its API key, through the gateway
    ]
    for base, headers in attempts:
        for method, body in (
            ("PUT", {"weights": {"1": 0, "2": 100}}),
            ("DELETE", None),
            ("GET", None),
        ):
            response = httpx.request(method, base + TRAFFIC, headers=headers, json=body)
            assert response.status_code == 403, response.text
    assert weights_of(stack) == {"1": 90, "2": 10}
    # The operator, through the gateway, may.
    response = httpx.put(
        stack.gateway.url + TRAFFIC,
        headers={"X-API-Key": stack.admin_key},
        json={"weights": {"1": 60, "2": 40}},
    )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "model": MODEL,
        "weights": {"1": 60, "2": 40},
        "default_version": "2",
        "key_header": KEY_HEADER,
    }
    assert metric(stack, "inference_traffic_weight", model=MODEL, version="1") == 60
    listed = httpx.get(stack.gateway.url + "/v1/models", headers=tenant.headers).json()
    assert next(m for m in listed["data"] if m["id"] == MODEL)["traffic"] == {"1": 60, "2": 40}
    response = httpx.delete(stack.gateway.url + TRAFFIC, headers={"X-API-Key": stack.admin_key})
    assert response.status_code == 200
    assert response.json()["weights"] is None
    assert metric(stack, "inference_traffic_weight", model=MODEL, version="2") == 100
    assert metric(stack, "inference_traffic_weight", model=MODEL, version="1") == 0


def test_an_oversized_key_is_refused(stack: Stack) -> None:
    headers = {**stack.bearer(stack.tenants[0]), "Content-Type": "application/json"}
    headers[KEY_HEADER] = "k" * 257
    predict = httpx.post(stack.inference.url + PREDICT, content=ONE_ROW, headers=headers)
    assert predict.status_code == 422, predict.text
    assert KEY_HEADER in predict.json()["detail"]
    oip = httpx.post(
        f"{stack.inference.url}/v2/models/{MODEL}/infer", content=OIP_ONE_ROW, headers=headers
    )
    assert oip.status_code == 400, oip.text
    assert KEY_HEADER in oip.json()["error"]
