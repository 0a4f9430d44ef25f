"""Anonymous and hostile-tenant traffic against real processes reaches no state that other
tenants depend on.

auth, the trivial upstream behind a proxy that holds every answer 150 ms (longer than the
deadline floor, so a client's `x-request-timeout-ms: 1` does cut its own requests short),
and one gateway. An innocent tenant, warmed up first, sends a request every 50 ms
throughout. Then 1000 requests: every public route and every protected one, anonymous or
with bogus keys, forged JWTs, huge headers, spoofed X-Forwarded-For, 1 ms deadlines, and
the hostile tenant's own valid key with 1 ms deadlines. Afterwards every breaker is closed
(in /metrics and in each status route), the innocent tenant got nothing but 200s, and the
junk keys reached auth no more often than the per-IP guard allows.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from narthex.common.errors import GatewayTimeout
from narthex.common.tokens import SigningKey, issue_token
from narthex.gateway.routing import UPSTREAMS
from narthex.testing.jwts import unsigned
from tests.support.delay import DelayProxy
from tests.support.loopback import in_own_thread
from tests.support.platform import (
    ONE_ITEM,
    PREDICT,
    Admin,
    Edge,
    PlanNumbers,
    Tenant,
    edge,
    running,
)

pytestmark = pytest.mark.slow

HOSTILE_REQUESTS = 1000
CONCURRENCY = 25
UPSTREAM_DELAY = 0.15  # above the 100 ms deadline floor
GUARD_LIMIT = 30  # token exchanges per client IP per minute (the gateway's default)
# The credentials hostile requests take turns with; JUNK_KEYS are the turns that send an
# API key never seen before (each one new).
CREDENTIAL_KINDS = 6
JUNK_KEYS = (1, 2)

PUBLIC = [
    ("GET", "/v1/status/auth"),
    ("GET", "/v1/status/features"),
    ("GET", "/v1/status/inference"),
    ("GET", "/v1/status/analytics"),
    ("GET", "/.well-known/jwks.json"),
    ("POST", "/v1/auth/token"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
]
PROTECTED = [
    ("POST", PREDICT),
    ("POST", "/v1/embeddings"),
    ("POST", "/v2/models/x/infer"),
    ("GET", "/v2/models"),
    ("POST", "/v1/events/transactions"),
    ("GET", "/v1/usage"),
    ("GET", "/v1/keys"),
    ("GET", "/v1/admin/tenants"),
    ("GET", "/v1/admin/models"),
    ("GET", "/v1/quota"),
]


# -- hostile requests ------------------------------------------------------------------------


def forged_tokens() -> Iterator[str]:
    """Tokens auth never issued: signed by another key (known or unknown kid), alg none,
    garbage, and longer than any token the gateway will read."""
    stranger = SigningKey.generate()
    claims = {"iss": "narthex-auth", "aud": "narthex", "exp": int(time.time()) + 600}
    while True:
        yield issue_token(
            stranger,
            issuer="narthex-auth",
            audience="narthex",
            subject="t_admin",
            plan="enterprise",
            roles=["admin"],
            scopes=["admin", "inference"],
        )
        yield unsigned(claims)
        yield f"eyJhbGciOiJSUzI1NiIsImtpZCI6I{secrets.token_urlsafe(8)}.e30.c2ln"
        yield "eyJ" + "A" * 9000


def hostile_requests(hostile: Tenant) -> Iterator[tuple[str, str, dict[str, str], bool]]:
    """(method, path, headers, carries a deadline) for each hostile request."""
    routes = itertools.cycle(PUBLIC + PROTECTED)
    tokens = forged_tokens()
    credentials: list[Any] = [
        dict,
        lambda: {"X-API-Key": f"nx_dev_{secrets.token_hex(8)}_{'Z' * 40}"},  # a new key each
        lambda: {"Authorization": f"Bearer nx_dev_{secrets.token_hex(8)}_{'Q' * 40}"},
        lambda: {"X-API-Key": "not-a-key"},
        lambda: {"Authorization": f"Bearer {next(tokens)}"},
        lambda: hostile.headers,  # a tenant of good standing, misbehaving
    ]
    assert len(credentials) == CREDENTIAL_KINDS
    extras: list[dict[str, str]] = [
        {"x-request-timeout-ms": "1"},
        {"x-request-timeout-ms": "0"},
        {"X-Pad": "p" * 16_000},
        {"X-Forwarded-For": "10.0.0.1, 127.0.0.2", "x-request-timeout-ms": "1"},
        {"x-request-timeout-ms": "999999999"},
        {},
    ]
    for i in range(HOSTILE_REQUESTS):
        method, path = next(routes)
        credential = credentials[i % CREDENTIAL_KINDS]()
        extra = extras[(i // CREDENTIAL_KINDS) % len(extras)]
        headers = {**credential, **extra, "Content-Type": "application/json"}
        yield method, path, headers, "x-request-timeout-ms" in extra


def refusal_kind(response: httpx.Response) -> str:
    """What kind of refusal, in each protocol's terms: a problem's type, OpenAI's error
    code (as a slug), the Open Inference Protocol's message (it has nothing else)."""
    try:
        body = response.json() if response.status_code >= 400 else None
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return ""
    if response.headers.get("content-type", "").startswith("application/problem"):
        return str(body.get("type", "")).rsplit("/", 1)[-1]
    if isinstance(body.get("error"), dict):
        return str(body["error"]["code"]).replace("_", "-")
    return str(body.get("error", ""))


async def flood(client: httpx.AsyncClient, hostile: Tenant) -> list[tuple[int, str, bool]]:
    """(status, problem type, carried a deadline) of each hostile request; 0 when the
    connection was refused outright."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(
        method: str, path: str, headers: dict[str, str], timed: bool
    ) -> tuple[int, str, bool]:
        async with gate:
            try:
                response = await client.request(method, path, headers=headers, content=ONE_ITEM)
            except httpx.HTTPError:
                return 0, "", timed
            return response.status_code, refusal_kind(response), timed

    return await asyncio.gather(*(one(*request) for request in hostile_requests(hostile)))


async def innocent_traffic(
    client: httpx.AsyncClient, tenant: Tenant, stop: asyncio.Event
) -> list[int]:
    statuses: list[int] = []
    while not stop.is_set():
        response = await client.post(PREDICT, headers=tenant.headers, content=ONE_ITEM)
        statuses.append(response.status_code)
        await asyncio.sleep(0.05)
    return statuses


# -- what the processes report ------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def breaker_states(metrics_text: str) -> dict[str, str]:
    """upstream -> the state its breaker is in, from the gateway's /metrics."""
    states = {}
    for (name, labels), value in samples(metrics_text).items():
        if name == "upstream_breaker_state" and value == 1.0:
            label = dict(labels)
            states[label["upstream"]] = label["state"]
    return states


def token_exchanges_at_auth(platform: Edge) -> float:
    """How many token exchanges the auth service has answered, by its own metrics."""
    text = httpx.get(platform.auth.url + "/metrics", timeout=5.0).text
    return sum(
        value
        for (name, labels), value in samples(text).items()
        if name == "http_requests_total" and ("route", "/v1/auth/token") in labels
    )


# -- the test -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    with edge(tmp_path_factory.mktemp("shared-state")) as started:
        yield started


async def test_anonymous_and_hostile_traffic_leaves_every_breaker_closed_and_tenants_served(
    platform: Edge, tmp_path: Path
) -> None:
    upstream_port = int(platform.upstream.url.rsplit(":", 1)[1])
    with in_own_thread(DelayProxy(upstream_port, delay=UPSTREAM_DELAY)) as slow:
        spec = platform.gateway(
            "gateway",
            inference_url=slow.url,
            features_url=slow.url,
            analytics_url=slow.url,
        )
        with running([spec], tmp_path) as (gateway,):
            admin = Admin(gateway.url, platform.admin_key)
            try:
                plan = admin.create_plan("roomy", PlanNumbers(rate=1000.0, burst=1000))
                innocent = admin.create_tenant("innocent", plan)
                hostile = admin.create_tenant("hostile", plan)
            finally:
                admin.close()
            async with httpx.AsyncClient(base_url=gateway.url, timeout=30.0) as client:
                # Both tenants in good standing: their keys exchanged and cached.
                for tenant in (innocent, hostile):
                    warm = await client.post(PREDICT, headers=tenant.headers, content=ONE_ITEM)
                    assert warm.status_code == 200, warm.text
                exchanges_before = token_exchanges_at_auth(platform)

                stop = asyncio.Event()
                bystander = asyncio.create_task(innocent_traffic(client, innocent, stop))
                outcomes = await flood(client, hostile)
                stop.set()
                during = await bystander

                after = [
                    (await client.post(PREDICT, headers=innocent.headers, content=ONE_ITEM))
                    for _ in range(10)
                ]
                metrics = (await client.get("/metrics")).text
                status = {name: await client.get(f"/v1/status/{name}") for name in UPSTREAMS}
                ready = await client.get("/readyz")
            exchanges = token_exchanges_at_auth(platform) - exchanges_before

    assert len(outcomes) == HOSTILE_REQUESTS
    seen = Counter((code, kind) for code, kind, _ in outcomes)
    # The only 5xx a hostile request may get is its own deadline's 504; never a 502 or
    # a 503 (an open breaker, an overwhelmed dependency), never a 500.
    for code, kind, timed in outcomes:
        if code >= 500:
            assert (code, timed) == (504, True), seen
            assert kind in ("upstream-timeout", GatewayTimeout.title), seen
    assert seen[(504, "upstream-timeout")] > 0, "no hostile request was cut by its deadline"
    assert breaker_states(metrics) == dict.fromkeys(UPSTREAMS, "closed"), seen
    for name, response in status.items():
        assert response.status_code == 200, (name, response.text)
        assert response.json()["breaker"] == "closed"
    assert ready.status_code == 200, ready.text
    # The innocent tenant noticed nothing.
    assert during, "the innocent tenant sent nothing during the flood"
    assert set(during) == {200}, Counter(during)
    assert {r.status_code for r in after} == {200}
    # Junk keys reached auth no more often than the per-IP guard allows (the warm-up
    # exchanges count against the same allowance), whatever route carried them.
    junk_keys = sum(1 for i in range(HOSTILE_REQUESTS) if i % CREDENTIAL_KINDS in JUNK_KEYS)
    assert junk_keys > 3 * GUARD_LIMIT
    assert exchanges <= GUARD_LIMIT, f"{exchanges:.0f} exchanges reached auth"
