"""The features app through its factory: ingestion, batchGet, validation, auth, metrics, probes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from narthex.common import scopes
from narthex.features.settings import FeaturesSettings
from narthex.transactions import DEFAULTS, FEATURES, AccountState, Transaction
from tests.features.support import (
    BACKENDS,
    PRODUCER,
    SERVICE,
    TENANT,
    Serving,
    bearer,
    entities,
    serving,
)
from tests.support.redis_cluster import (
    LocalCluster,
    redis_cluster_fixture,  # noqa: F401 - the `redis_cluster` fixture
)

NOW = time.time()


def event(i: int, *, account: str = "acct1", **change: Any) -> dict[str, Any]:
    return {
        "event_id": f"e{i}",
        "account_id": account,
        "merchant_id": f"m{i % 3}",
        "amount": 12.5 + i,
        "currency": "EUR",
        "timestamp": NOW - 3600 + i * 60,
        "channel": "online",
        **change,
    }


# Numbers JSON can carry but orjson will not write: put in the body by hand.
INF, NEG_INF, BIG = "<inf>", "<-inf>", "<big>"
NUMBERS = {INF: b"1e400", NEG_INF: b"-1e400", BIG: str(10**400).encode()}


@pytest.fixture(params=BACKENDS)
async def served(request: pytest.FixtureRequest) -> AsyncIterator[Serving]:
    async with serving(request.param) as served:
        yield served


def metric(text: str, sample: str) -> float:
    """The value of one sample (`name{labels}` exactly) of a Prometheus text page."""
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    raise AssertionError(f"no sample {sample}")


# -- ingestion and batchGet -----------------------------------------------------------------------


async def test_ingest_then_batch_get(served: Serving) -> None:
    events = [event(i, account=f"acct{i % 2}") for i in range(6)]
    response = await served.ingest(events)
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 6, "duplicates": 0, "stale": 0}

    at = NOW + 10.0
    response = await served.batch_get(["acct1", "nobody", "acct0", "acct1"], at=at)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["schema"] == list(FEATURES)
    assert body["as_of"] == at
    assert [(f["tenant"], f["account"]) for f in body["features"]] == [
        (TENANT, account) for account in ("acct1", "nobody", "acct0", "acct1")
    ]

    for item in body["features"]:
        if item["account"] == "nobody":
            assert item == {
                "tenant": TENANT,
                "account": "nobody",
                "known": False,
                "values": DEFAULTS,
                "age_seconds": None,
            }
            continue
        reference = AccountState()
        mine = [e for e in events if e["account_id"] == item["account"]]
        for e in mine:
            reference.apply(Transaction.from_dict(e))
        assert item["known"] is True
        assert item["values"] == reference.features(at)
        assert list(item["values"]) == list(FEATURES)
        assert item["age_seconds"] == pytest.approx(at - max(e["timestamp"] for e in mine))
    assert body["features"][0]["values"]["txn_count_24h"] == 3


async def test_batch_get_reads_at_server_time_by_default(served: Serving) -> None:
    await served.ingest([event(0, timestamp=time.time() - 100)])
    before = time.time()
    body = (await served.batch_get(["acct1"])).json()
    assert before <= body["as_of"] <= time.time()
    (item,) = body["features"]
    assert item["age_seconds"] == pytest.approx(100, abs=5)
    assert item["values"]["seconds_since_last"] == pytest.approx(100, abs=5)


async def test_a_batch_sent_again_changes_nothing(served: Serving) -> None:
    events = [event(i) for i in range(5)] + [event(2), event(3)]
    first = (await served.ingest(events)).json()
    assert first == {"accepted": 5, "duplicates": 2, "stale": 0}
    snapshot = (await served.batch_get(["acct1"], at=NOW)).json()
    for _ in range(2):
        again = (await served.ingest(events)).json()
        assert again == {"accepted": 0, "duplicates": 7, "stale": 0}
    assert (await served.batch_get(["acct1"], at=NOW)).json() == snapshot


async def test_stale_events_are_counted_as_such(served: Serving) -> None:
    await served.ingest([event(0)])
    old = event(1, timestamp=NOW - 3600 - 8 * 86_400)
    assert (await served.ingest([old])).json() == {"accepted": 0, "duplicates": 0, "stale": 1}


async def test_an_empty_batch_get_is_an_empty_answer(served: Serving) -> None:
    body = (await served.batch_get([], at=NOW)).json()
    assert body == {"schema": list(FEATURES), "as_of": NOW, "features": []}


# -- a bad event refuses the batch, and nothing is written ----------------------------------------

BAD_EVENTS: list[tuple[str, Any, str]] = [
    ("negative amount", event(3, amount=-5), "events[3].amount: must be positive"),
    ("zero amount", event(3, amount=0), "events[3].amount: must be positive"),
    ("infinite amount", event(3, amount=INF), "events[3].amount: must be finite"),
    ("huge integer amount", event(3, amount=BIG), "events[3].amount: must be finite"),
    ("string amount", event(3, amount="12"), "events[3].amount: must be a number"),
    ("bool amount", event(3, amount=True), "events[3].amount: must be a number"),
    ("unknown currency", event(3, currency="XXX"), "events[3].currency: must be one of"),
    ("future", event(3, timestamp=NOW + 3600), "s ahead of server time (at most 300 s)"),
    ("milliseconds", event(3, timestamp=NOW * 1000), "events[3].timestamp"),
    ("infinite time", event(3, timestamp=NEG_INF), "events[3].timestamp: must be finite"),
    ("no event id", {k: v for k, v in event(3).items() if k != "event_id"}, "events[3].event_id"),
    ("empty account", event(3, account=""), "events[3].account_id: must be 1 to 128"),
    ("null merchant", event(3, merchant_id=None), "events[3].merchant_id: must be a string"),
    ("spaced id", event(3, event_id="a b"), "events[3].event_id: must not contain whitespace"),
    ("unknown channel", event(3, channel="fax"), "events[3].channel: must be one of"),
    ("extra field", event(3, colour="red"), "events[3].colour: is not a transaction field"),
    ("not an object", [1, 2], "events[3]: must be an object"),
]


@pytest.mark.parametrize(("bad", "message"), [(b, m) for _, b, m in BAD_EVENTS],
                         ids=[name for name, _, _ in BAD_EVENTS])  # fmt: skip
async def test_one_bad_event_refuses_the_batch_naming_it(
    served: Serving, bad: Any, message: str
) -> None:
    events = [event(i, account=f"acct{i}") for i in range(6)]
    events[3] = bad
    body = orjson.dumps({"events": events})
    for marker, number in NUMBERS.items():
        body = body.replace(orjson.dumps(marker), number)
    response = await served.client.post(
        "/v1/events/transactions",
        content=body,
        headers={**PRODUCER, "content-type": "application/json"},
    )
    assert response.status_code == 422, response.text
    problem = response.json()
    assert response.headers["content-type"] == "application/problem+json"
    assert problem["type"].endswith("/validation-failed")
    assert message in problem["detail"], problem["detail"]
    assert problem["errors"][0]["loc"][:3] == ["body", "events", 3]
    await assert_nothing_written(served)


async def assert_nothing_written(served: Serving) -> None:
    assert await served.store.states([(TENANT, f"acct{i}") for i in range(6)]) == [None] * 6
    assert await served.redis_keys() == []
    metrics = (await served.client.get("/metrics")).text
    assert metric(metrics, 'features_events_total{outcome="accepted"}') == 0


async def test_every_problem_is_named_at_once(served: Serving) -> None:
    events = [event(0), event(1, amount=-1, currency="XXX"), event(2), event(3, timestamp=None)]
    response = await served.ingest(events)
    assert response.status_code == 422
    problem = response.json()
    assert problem["detail"] == (
        "events[1].currency: must be one of CAD, CHF, EUR, GBP, JPY, USD, not 'XXX';"
        " events[1].amount: must be positive, not -1.0;"
        " events[3].timestamp: must be a number (UTC epoch seconds)"
    )
    assert [e["loc"] for e in problem["errors"]] == [
        ["body", "events", 1, "currency"],
        ["body", "events", 1, "amount"],
        ["body", "events", 3, "timestamp"],
    ]
    metrics = (await served.client.get("/metrics")).text
    assert metric(metrics, 'features_events_total{outcome="refused"}') == 4


async def test_what_is_echoed_back_is_escaped() -> None:
    async with serving() as served:
        body = orjson.dumps({"events": [event(0, colour="red")]}).replace(b"colour", b"\\ud800")
        response = await served.client.post(
            "/v1/events/transactions",
            content=body,
            headers={**PRODUCER, "content-type": "application/json"},
        )
        assert response.status_code == 422
        assert "events[0].'\\ud800': is not a transaction field" in response.json()["detail"]


async def test_nan_is_refused() -> None:
    async with serving() as served:
        body = orjson.dumps({"events": [event(0, amount=0.5)]}).replace(b"0.5", b"NaN")
        response = await served.client.post(
            "/v1/events/transactions",
            content=body,
            headers={**PRODUCER, "content-type": "application/json"},
        )
        assert response.status_code == 422
        assert "events[0].amount: must be finite" in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"events": []}, "events: must hold at least one event"),
        ({"events": [event(i) for i in range(1001)]}, "events: at most 1000 events per request"),
        ({}, "events"),
        ({"events": {"0": event(0)}}, "events"),
        ({"events": [event(0)], "extra": 1}, "extra"),
    ],
    ids=["empty", "1001 events", "no events", "not a list", "unknown field"],
)
async def test_a_malformed_batch_is_a_422(served: Serving, body: Any, message: str) -> None:
    response = await served.client.post("/v1/events/transactions", json=body, headers=PRODUCER)
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]
    await assert_nothing_written(served)


async def test_ten_thousand_events_are_refused_by_size_before_parsing(served: Serving) -> None:
    events = [event(i) for i in range(10_000)]
    response = await served.ingest(events)
    assert response.status_code == 413
    assert response.json()["type"].endswith("/payload-too-large")
    await assert_nothing_written(served)


async def test_the_event_count_limit_is_a_setting() -> None:
    async with serving(max_batch_events=10, max_body_bytes=1 << 24) as served:
        assert (await served.ingest([event(i) for i in range(10)])).status_code == 200
        response = await served.ingest([event(i) for i in range(10_000)])
        assert response.status_code == 422
        assert "at most 10 events per request, not 10000" in response.json()["detail"]


async def test_max_future_is_a_setting() -> None:
    async with serving(max_future_seconds=0) as served:
        response = await served.ingest([event(0, timestamp=time.time() + 30)])
        assert response.status_code == 422
        assert (
            "events[0].timestamp: is 30 s ahead of server time (at most 0 s)"
            in (response.json()["detail"])
        )


# -- batchGet validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"entities": entities("a") * 1001}, "entities: at most 1000 entities per request, not"),
        ({"entities": entities("a"), "at": -1}, "body.at"),
        ({"entities": entities("a"), "at": "soon"}, "body.at"),
        ({"entities": entities("x" * 129)}, "body.entities.0.account"),
        ({"entities": entities("")}, "body.entities.0.account"),
        ({"entities": entities("a", tenant="")}, "body.entities.0.tenant"),
        ({"entities": [{"tenant": TENANT, "account": 7}]}, "body.entities.0.account"),
        ({"entities": [{"account": "a"}]}, "body.entities.0.tenant"),
        ({"entities": [{**entities("a")[0], "x": 1}]}, "body.entities.0.x"),
        ({"entities": ["a"]}, "body.entities.0"),  # an account alone names no tenant
        ({"entities": entities("a b")}, "entities[0].account: must not contain whitespace"),
        (
            {"entities": entities("ok", "a\x00b")},
            "entities[1].account: must not contain whitespace or control",
        ),
        ({"entities": entities("a", tenant="t\tx")}, "entities[0].tenant: must not contain"),
        ({"entities": "acct1"}, "body.entities"),
        ({}, "body.entities"),
        ({"entities": [], "extra": 1}, "body.extra"),
    ],
)
async def test_a_bad_batch_get_is_a_422(served: Serving, body: Any, where: str) -> None:
    response = await served.client.post(
        "/internal/v1/features:batchGet", json=body, headers=SERVICE
    )
    assert response.status_code == 422, response.text
    assert where in response.json()["detail"]


@pytest.mark.parametrize("at", [b"NaN", b"Infinity", b"1e400"])
async def test_a_non_finite_instant_is_a_422(at: bytes) -> None:
    async with serving() as served:
        response = await served.client.post(
            "/internal/v1/features:batchGet",
            content=b'{"entities": [{"tenant": "t", "account": "a"}], "at": ' + at + b"}",
            headers={**SERVICE, "content-type": "application/json"},
        )
        assert response.status_code == 422, response.text


async def test_the_entity_limit_is_a_setting() -> None:
    async with serving(max_entities=3) as served:
        assert (await served.batch_get(["a", "b", "c"])).status_code == 200
        response = await served.batch_get(["a", "b", "c", "d"])
        assert response.status_code == 422
        assert "at most 3 entities per request, not 4" in response.json()["detail"]


# -- auth ------------------------------------------------------------------------------------------


ADMIN_ALL = bearer(
    scopes.ADMIN_SCOPE, scopes.INFERENCE, scopes.EVENTS, scopes.USAGE, role=scopes.ADMIN
)


@pytest.mark.parametrize(
    ("path", "body", "wrong"),
    [
        (
            "/v1/events/transactions",
            {"events": [event(0)]},
            [SERVICE, bearer(scopes.INFERENCE), bearer(scopes.USAGE, scopes.KEYS)],
        ),
        (
            "/internal/v1/features:batchGet",
            {"entities": entities("acct1")},
            [
                PRODUCER,
                bearer(scopes.USAGE, scopes.KEYS),
                # A tenant's token, even an admin's with every scope, never reads features:
                # batchGet names any tenant's accounts.
                ADMIN_ALL,
                # The scope alone is not enough (no tenant can be granted it anyway)...
                bearer(scopes.FEATURES_LOOKUP),
                # ...nor is the service role without it.
                bearer(scopes.INFERENCE, role=scopes.SERVICE, tenant="svc-inference"),
            ],
        ),
    ],
    ids=["ingest", "batchGet"],
)
async def test_routes_need_a_token_with_their_role_and_scope(
    path: str, body: dict[str, Any], wrong: list[dict[str, str]]
) -> None:
    async with serving() as served:
        response = await served.client.post(path, json=body)
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
        forged = {"Authorization": "Bearer " + "x" * 40}
        assert (await served.client.post(path, json=body, headers=forged)).status_code == 401
        for headers in wrong:
            response = await served.client.post(path, json=body, headers=headers)
            assert response.status_code == 403, response.text
            assert "requires the" in response.json()["detail"]
        assert await served.store.states([(TENANT, "acct1")]) == [None]


# -- tenants ---------------------------------------------------------------------------------------


async def test_events_count_under_the_callers_tenant_only(served: Serving) -> None:
    """Tenant A posting events for an account id B also has changes nothing of B's, and
    cannot pre-claim B's event ids."""
    mine = [event(i, amount=900.0) for i in range(4)]
    assert (await served.ingest(mine, tenant="t_a")).json()["accepted"] == 4
    both = (await served.client.post(
        "/internal/v1/features:batchGet",
        json={"entities": [*entities("acct1", tenant="t_a"), *entities("acct1", tenant="t_b")],
              "at": NOW},
        headers=SERVICE,
    )).json()["features"]  # fmt: skip
    assert [(f["tenant"], f["known"]) for f in both] == [("t_a", True), ("t_b", False)]
    assert both[1]["values"] == DEFAULTS

    # The same event ids under B: B's own events, counted as B's.
    theirs = [event(i, amount=3.0) for i in range(2)]
    assert (await served.ingest(theirs, tenant="t_b")).json() == {
        "accepted": 2,
        "duplicates": 0,
        "stale": 0,
    }
    a, b = (await served.client.post(
        "/internal/v1/features:batchGet",
        json={"entities": [*entities("acct1", tenant="t_a"), *entities("acct1", tenant="t_b")],
              "at": NOW},
        headers=SERVICE,
    )).json()["features"]  # fmt: skip
    assert a["values"]["txn_count_24h"] == 4
    assert b["values"]["txn_count_24h"] == 2
    assert b["values"]["amount_sum_24h"] == pytest.approx(2 * 3.0 * 1.08)


async def test_the_service_reads_every_tenants_accounts_through_a_redis_cluster(
    redis_cluster: LocalCluster,
) -> None:
    async with serving("cluster", cluster=redis_cluster) as served:
        assert (await served.client.get("/readyz")).json()["checks"]["redis"] == {"status": "up"}
        accounts = [f"acct{i}" for i in range(40)]  # spread over the three nodes' slots
        for tenant in ("t_a", "t_b"):
            events = [event(i, account=account) for i, account in enumerate(accounts)]
            if tenant == "t_b":
                events = events[:20]
            response = await served.ingest(events, tenant=tenant)
            assert response.json()["accepted"] == len(events)
        response = await served.client.post(
            "/internal/v1/features:batchGet",
            json={
                "entities": entities(*accounts, tenant="t_a") + entities(*accounts, tenant="t_b")
            },
            headers=SERVICE,
        )
        assert response.status_code == 200, response.text
        known = [(f["tenant"], f["account"]) for f in response.json()["features"] if f["known"]]
        assert known == [("t_a", a) for a in accounts] + [("t_b", a) for a in accounts[:20]]


# -- metrics, probes, failures ---------------------------------------------------------------------


async def test_metrics_count_outcomes_and_batch_gets(served: Serving) -> None:
    await served.ingest([event(0), event(1), event(1)])
    await served.ingest([event(2, timestamp=NOW - 3600 - 9 * 86_400)])
    await served.ingest([event(3, amount=-1), event(4)])
    await served.batch_get(["acct1", "b", "c"])
    await served.batch_get(["acct1"])
    text = (await served.client.get("/metrics")).text
    counts = {
        outcome: metric(text, f'features_events_total{{outcome="{outcome}"}}')
        for outcome in ("accepted", "duplicate", "stale", "refused")
    }
    assert counts == {"accepted": 2, "duplicate": 1, "stale": 1, "refused": 2}
    assert metric(text, "features_batch_get_duration_seconds_count") == 2
    assert metric(text, "features_batch_get_entities_sum") == 4
    assert metric(text, 'features_batch_get_entities_bucket{le="1.0"}') == 1
    assert metric(text, 'features_store_errors_total{operation="ingest"}') == 0


async def test_readiness_checks_redis_when_configured() -> None:
    async with serving("redis") as served:
        response = await served.client.get("/readyz")
        assert response.status_code == 200
        assert response.json()["checks"]["redis"] == {"status": "up"}
    async with serving() as served:
        assert "redis" not in (await served.client.get("/readyz")).json()["checks"]


async def test_redis_down_is_a_503_and_not_ready() -> None:
    async with serving(redis_url="redis://127.0.0.1:1/0", redis_timeout=0.2) as served:
        response = await served.ingest([event(0)])
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert response.json()["type"].endswith("/store-unavailable")
        response = await served.batch_get(["acct1"])
        assert response.status_code == 503
        ready = await served.client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["redis"]["status"] == "down"
        text = (await served.client.get("/metrics")).text
        assert metric(text, 'features_store_errors_total{operation="ingest"}') == 1
        assert metric(text, 'features_store_errors_total{operation="batch_get"}') == 1
        # Refused for validity before the store is asked: still a 422, not a 503.
        assert (await served.ingest([event(0, amount=-1)])).status_code == 422


async def test_openapi_describes_both_routes() -> None:
    async with serving() as served:
        spec = (await served.client.get("/openapi.json")).json()
    assert {"/v1/events/transactions", "/internal/v1/features:batchGet"} <= set(spec["paths"])
    event_schema = spec["components"]["schemas"]["IngestRequest"]["properties"]["events"]
    assert event_schema["items"]["properties"]["currency"]["enum"] == [
        "USD", "EUR", "GBP", "CHF", "CAD", "JPY",
    ]  # fmt: skip
    answer = spec["components"]["schemas"]["BatchGetResponse"]["properties"]
    assert {"schema", "as_of", "features"} <= set(answer)


# -- settings --------------------------------------------------------------------------------------


def test_settings_refuse_a_bad_redis_url_and_a_short_margin() -> None:
    with pytest.raises(ValidationError, match="redis_url"):
        FeaturesSettings(redis_url="http://127.0.0.1:6379")
    with pytest.raises(ValidationError, match="NARTHEX_FEATURES_RETENTION_MARGIN_SECONDS"):
        FeaturesSettings(max_future_seconds=600, retention_margin_seconds=60)
    assert FeaturesSettings().state_ttl_seconds == 31 * 86_400
    short = FeaturesSettings(max_future_seconds=0, retention_margin_seconds=0.5)
    assert short.state_ttl_seconds == 30 * 86_400 + 1
