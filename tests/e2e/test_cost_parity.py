"""Cost parity: every body an upstream would read is charged exactly the items it carries, or
refused at the edge; never charged less. Real processes: auth, the gateway, and behind it

- an echo upstream (`tests.support.echo`) that parses bodies with the services' own request
  models, FastAPI's body handling and inference's OIP codec, and answers how many items it
  found: the matrix below sends N-item bodies (N random, seeded) for every limited route with
  a cost (embeddings `input`, predict `instances`, OIP `inputs` as JSON and with binary
  tensors, events `events`) in every text encoding `json.loads` reads, every content coding
  inference undoes, nested, with and without charset parameters;
- the real inference service (minilm) for the issue's own case: 40-text embeddings bodies
  with a BOM or in UTF-16, which it serves in full.

The charge is read from the daily quota's `RateLimit` remaining (no refill within a day), so
a request charged without a RateLimit header (or a refusal charged anyway) shows up in the
next request's difference, and in the total checked at the end.
"""

from __future__ import annotations

import gzip
import json
import random
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.support.models import builtin_repository
from tests.support.platform import (
    Admin,
    Edge,
    Ledger,
    PlanNumbers,
    Spec,
    Tenant,
    edge,
    exchange,
    inference_spec,
    module_argv,
    running,
)
from tests.support.services import Service

pytestmark = pytest.mark.slow

SEED = 20261204
BIG_PLAN = PlanNumbers(rate=100_000, burst=1_000_000, daily_quota=100_000_000, max_items=10_000)
HEADER_LENGTH = "Inference-Header-Content-Length"
WORDS = ["caf\u00e9", "na\u00efve", "\u2603", "\U0001f600", "plain", "\u65e5\u672c", "x y"]


# -- the platform ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Parity:
    echo_gateway: str
    inference_gateway: str
    token: str


@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Parity]:
    directory = tmp_path_factory.mktemp("parity")
    repository = builtin_repository(["minilm"])
    with edge(directory) as platform:
        echo = Spec("echo", module_argv("tests.support.echo", "--port", "{port}"))
        inference = inference_spec("inference", platform.auth.url, repository, models="minilm")
        with running([echo, inference], directory) as (echo_service, inference_service):
            gateways = [
                gateway(platform, "gw-echo", echo_service),
                gateway(platform, "gw-inference", inference_service),
            ]
            with running(gateways, directory) as (gw_echo, gw_inference):
                tenant = big_tenant(gw_echo.url, platform)
                # One tenant, one token: both gateways verify it against the same auth.
                yield Parity(gw_echo.url, gw_inference.url, exchange(gw_echo.url, tenant.key))


def caller(parity: Parity, url: str) -> httpx.Client:
    return httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {parity.token}"}, timeout=60.0
    )


def gateway(platform: Edge, label: str, upstream: Service) -> Spec:
    return platform.gateway(label, inference_url=upstream.url, features_url=upstream.url)


def big_tenant(gateway_url: str, platform: Edge) -> Tenant:
    admin = Admin(gateway_url, platform.admin_key)
    try:
        return admin.create_tenant("parity", admin.create_plan("parity", BIG_PLAN))
    finally:
        admin.close()


# -- bodies ---------------------------------------------------------------------------------

TextEncoding = Callable[[str], tuple[bytes, str | None]]  # JSON text -> body, Content-Type


def typed(encode: Callable[[str], bytes], content_type: str | None) -> TextEncoding:
    return lambda text: (encode(text), content_type)


JSON = "application/json"
TEXT_ENCODINGS: dict[str, TextEncoding] = {
    "utf-8": typed(str.encode, JSON),
    "utf-8; charset": typed(str.encode, "application/json; charset=utf-8"),
    "utf-8 no type": typed(str.encode, None),
    "utf-8 text/plain": typed(str.encode, "text/plain"),
    "utf-8 BOM": typed(lambda t: b"\xef\xbb\xbf" + t.encode(), JSON),
    "utf-16 BOM": typed(lambda t: t.encode("utf-16"), JSON),
    "utf-16-le": typed(lambda t: t.encode("utf-16-le"), JSON),
    "utf-16-be": typed(lambda t: t.encode("utf-16-be"), JSON),
    "utf-16-be BOM": typed(lambda t: ("\ufeff" + t).encode("utf-16-be"), JSON),
    "utf-16-le; charset=utf-16": typed(
        lambda t: t.encode("utf-16-le"), "application/json; charset=UTF-16"
    ),
    "utf-16-le BOM; charset=utf-16le": typed(
        lambda t: ("\ufeff" + t).encode("utf-16-le"), 'application/json; charset="utf-16le"'
    ),
    "utf-32 BOM": typed(lambda t: t.encode("utf-32"), JSON),
    "utf-32-le": typed(lambda t: t.encode("utf-32-le"), JSON),
    "utf-32-be": typed(lambda t: t.encode("utf-32-be"), JSON),
    "utf-32-be; charset": typed(
        lambda t: t.encode("utf-32-be"), "application/json; charset=utf-32be"
    ),
}


def members(data: bytes) -> bytes:
    cut = max(1, len(data) // 3)
    return b"".join(gzip.compress(data[i : i + cut]) for i in range(0, len(data), cut))


Coding = tuple[str | None, Callable[[bytes], bytes]]
CODINGS: dict[str, Coding] = {
    "identity": (None, lambda b: b),
    "gzip": ("gzip", gzip.compress),
    "x-gzip": ("x-gzip", gzip.compress),
    "deflate": ("deflate", zlib.compress),
    "raw deflate": ("deflate", lambda b: zlib.compress(b, wbits=-zlib.MAX_WBITS)),
    "gzip members": ("gzip", members),
    "gzip, deflate": ("gzip, deflate", lambda b: zlib.compress(gzip.compress(b))),
    "deflate, gzip": ("deflate, gzip", lambda b: gzip.compress(zlib.compress(b))),
}


@dataclass(frozen=True)
class Case:
    path: str
    body: bytes
    headers: dict[str, str]
    items: int


def texts(rng: random.Random, n: int) -> list[str]:
    return [f"{rng.choice(WORDS)} {i} {rng.choice(WORDS)}" for i in range(n)]


def json_case(path: str, document: dict[str, Any], n: int, text: str, coding: str) -> Case:
    body, content_type = TEXT_ENCODINGS[text](json.dumps(document, ensure_ascii=False))
    header, compress = CODINGS[coding]
    headers = {} if content_type is None else {"Content-Type": content_type}
    if header is not None:
        headers["Content-Encoding"] = header
    return Case(path, compress(body), headers, n)


def binary_case(n: int, text: str, coding: str) -> Case:
    tensor = bytes(range(16)) * n  # FP32 [n, 4]
    header = {
        "inputs": [
            {
                "name": "x",
                "datatype": "FP32",
                "shape": [n, 4],
                "parameters": {"binary_data_size": len(tensor)},
            }
        ]
    }
    encoded, content_type = TEXT_ENCODINGS[text](json.dumps(header))
    name, compress = CODINGS[coding]
    headers = {HEADER_LENGTH: str(len(encoded))}
    if content_type is not None:  # what tritonclient sends, or the case's own type
        headers["Content-Type"] = (
            "application/octet-stream" if content_type == JSON else content_type
        )
    if name is not None:
        headers["Content-Encoding"] = name
    return Case("/v2/models/fraud/infer", compress(encoded + tensor), headers, n)


def matrix(rng: random.Random) -> Iterator[tuple[str, Case]]:
    for text in TEXT_ENCODINGS:
        for coding in CODINGS:
            label = f"{text} + {coding}"
            n = rng.randint(1, 60)
            embed = {"model": "minilm", "input": texts(rng, n)}
            if n == 1 and rng.random() < 0.5:
                embed["input"] = texts(rng, 1)[0]  # a single text is one item
            yield f"embeddings, {label}", json_case("/v1/embeddings", embed, n, text, coding)
            n = rng.randint(1, 60)
            instances = {"instances": [[rng.random(), i, "\u00e9"] for i in range(n)]}
            yield (
                f"predict, {label}",
                json_case("/v1/models/fraud/predict", instances, n, text, coding),
            )
            n = rng.randint(1, 60)
            events = {"events": [{"event_id": f"e{i}", "note": "\u2603"} for i in range(n)]}
            yield f"events, {label}", json_case("/v1/events/transactions", events, n, text, coding)
            n = rng.randint(1, 60)
            tensor = {"name": "text", "datatype": "BYTES", "shape": [n], "data": texts(rng, n)}
            oip_json = {"inputs": [tensor]}
            yield (
                f"OIP JSON, {label}",
                json_case("/v2/models/minilm/infer", oip_json, n, text, coding),
            )
            yield f"OIP binary, {label}", binary_case(rng.randint(1, 60), text, coding)


# -- the matrix through the gateway, against the echo ---------------------------------------


def test_every_encoding_an_upstream_reads_is_charged_exactly_its_items(parity: Parity) -> None:
    rng = random.Random(SEED)
    failures: list[str] = []
    with caller(parity, parity.echo_gateway) as client:
        ledger = Ledger(client)
        served = 0
        for label, case in matrix(rng):
            response = client.post(case.path, content=case.body, headers=case.headers)
            if response.status_code != 200:
                failures.append(f"{label}: {response.status_code} {response.text[:200]}")
                continue
            charged = ledger.charged(response)
            parsed = response.json()["items"]
            served += parsed
            if not (charged == parsed == case.items):
                failures.append(f"{label}: sent {case.items}, served {parsed}, charged {charged}")
        # Nothing charged that was not reported: the day's use is what the answers said.
        unreported = ledger.remaining - ledger.quota()
        if unreported:
            failures.append(f"{unreported} items charged to requests the upstream never served")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:40])
    assert served > 0


REFUSED: dict[str, tuple[dict[str, str], bytes, int]] = {
    # name: (headers, body, the edge's status)
    "latin-1 charset": (
        {"Content-Type": "application/json; charset=iso-8859-1"},
        '{"input": ["caf\u00e9"], "model": "minilm"}'.encode("latin-1"),
        415,
    ),
    "UTF-16 labelled UTF-8": (
        {"Content-Type": "application/json; charset=utf-8"},
        json.dumps({"input": ["a"] * 40, "model": "minilm"}).encode("utf-16"),
        400,
    ),
    "brotli": ({"Content-Type": JSON, "Content-Encoding": "br"}, b"\x0b\x02\x80{}\x03", 415),
    "truncated gzip": (
        {"Content-Type": JSON, "Content-Encoding": "gzip"},
        gzip.compress(json.dumps({"input": ["a"] * 40, "model": "minilm"}).encode())[:-8],
        400,
    ),
    "gzip bomb": (
        {"Content-Type": JSON, "Content-Encoding": "gzip"},
        gzip.compress(b'{"input": ["' + b"a" * (8 << 20) + b'"], "model": "minilm"}'),
        413,
    ),
    "17 gzip members": (
        {"Content-Type": JSON, "Content-Encoding": "gzip"},
        b"".join(gzip.compress(b" ") for _ in range(16)) + gzip.compress(b'{"input": "a"}'),
        400,
    ),
    "not JSON": ({"Content-Type": JSON}, b"input=a&input=b", 400),
    "NaN (json.loads reads it)": ({"Content-Type": JSON}, b'{"input": ["a"], "x": NaN}', 400),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_body_the_edge_cannot_count_is_refused_and_charged_nothing(
    parity: Parity, name: str
) -> None:
    headers, body, status = REFUSED[name]
    with caller(parity, parity.echo_gateway) as client:
        ledger = Ledger(client)
        response = client.post("/v1/embeddings", content=body, headers=headers)
        assert response.status_code == status, response.text
        # In the shape of the route's protocol: OpenAI's error object.
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert "ratelimit" not in response.headers
        assert ledger.quota() == ledger.remaining


# -- the case, through the real inference service ------------------------------------


INFERENCE_CASES = [
    "utf-8 BOM + identity",
    "utf-16 BOM + identity",
    "utf-16-be + identity",
    "utf-32-le + gzip",
    "utf-16-le; charset=utf-16 + deflate",
    "utf-8 + gzip members",
]


@pytest.mark.parametrize("label", INFERENCE_CASES)
def test_real_inference_serves_exactly_what_was_charged(parity: Parity, label: str) -> None:
    text, _, coding = label.partition(" + ")
    rng = random.Random(f"{SEED}{label}")
    n = 40 if "identity" in coding else rng.randint(2, 40)
    document = {"model": "minilm", "input": texts(rng, n)}
    case = json_case("/v1/embeddings", document, n, text, coding)
    with caller(parity, parity.inference_gateway) as client:
        ledger = Ledger(client)
        response = client.post(case.path, content=case.body, headers=case.headers)
        assert response.status_code == 200, response.text
        assert len(response.json()["data"]) == n
        assert ledger.charged(response) == n
        # The same batch over the Open Inference Protocol (BYTES tensor), binary-free.
        tensor = {"name": "text", "datatype": "BYTES", "shape": [n], "data": document["input"]}
        oip = json_case("/v2/models/minilm/infer", {"inputs": [tensor]}, n, text, coding)
        response = client.post(oip.path, content=oip.body, headers=oip.headers)
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0]["shape"] == [n, 384]
        assert ledger.charged(response) == n
