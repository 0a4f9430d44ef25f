"""The gateway's proxy end to end: the real gateway app in process, real upstream servers.

The gateway is `create_app(...)` with its lifespan running, called through httpx's
ASGI transport; every upstream is a real HTTP server on 127.0.0.1 (a misbehaving
`UpstreamServer`, or a `ScriptedUpstream` that answers with the exact status, headers
and body a test writes), so what crosses the wire is observed from the upstream's side.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import AnyHttpUrl
from starlette.types import ASGIApp, Message

from narthex.common import scopes
from narthex.common.errors import PROBLEM_BASE
from narthex.common.plans import TenantLimits
from narthex.gateway.main import create_app
from narthex.gateway.resources import GatewayState
from narthex.gateway.routing import UPSTREAMS
from narthex.gateway.settings import GatewaySettings
from narthex.testing.lifespan import started
from tests.support import tokens
from tests.support.plans import FixedPlans
from tests.support.scripted import Reply, ScriptedUpstream
from tests.support.upstream import UpstreamServer, refusing_port

MAX_BODY = 1024
# Timing assertions allow this much for a loaded machine; counts are always exact.
SLACK = 0.3
BOUND = 10.0  # no test may hang: every gateway call runs under this

# Short timeouts keep failure tests fast; a breaker that only opens when a test asks.
BASE_SETTINGS: dict[str, Any] = {
    "tracing": False,
    "max_body_bytes": MAX_BODY,
    "upstream_connect_timeout": 0.5,
    "upstream_try_timeout": 1.0,
    "upstream_deadline": 2.0,
    "upstream_retries": True,
    "upstream_max_attempts": 3,
    "breaker_fail_max": 100,
    "breaker_reset_timeout": 30.0,
}
SECRET = "SECRET-STACKTRACE"
REQUEST_ID = re.compile(r"[0-9a-f]{32}")


# -- the gateway under test ----------------------------------------------------------------


@dataclass
class Gateway:
    app: ASGIApp  # started: each request gets the lifespan's state, as under uvicorn
    state: GatewayState
    http: httpx.AsyncClient

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        async with asyncio.timeout(BOUND):
            return await self.http.request(method, url, **kwargs)

    async def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.request("GET", url, **kwargs)

    async def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.request("POST", url, **kwargs)


def gateway_settings(urls: str | Mapping[str, str], **overrides: Any) -> GatewaySettings:
    """Settings with every upstream at `urls` (one URL for all four, or one each)."""
    url = dict.fromkeys(UPSTREAMS, urls) if isinstance(urls, str) else dict(urls)
    options: dict[str, Any] = {**BASE_SETTINGS, **overrides}
    return GatewaySettings(
        auth_url=AnyHttpUrl(url["auth"]),
        features_url=AnyHttpUrl(url["features"]),
        inference_url=AnyHttpUrl(url["inference"]),
        analytics_url=AnyHttpUrl(url["analytics"]),
        **options,
    )


# The proxy's own behaviour is under test here, not authentication (tests/gateway/
# test_identity.py and tests/e2e do that against a real auth service): the gateway trusts
# the test key (tests.support.tokens), and the client sends a token that may call every route.
def token_for(
    subject: str = "t_proxytests",
    roles: Sequence[str] = (scopes.ADMIN,),
    granted: Iterable[str] = scopes.scopes_for({scopes.ADMIN}),
) -> str:
    return tokens.token(roles, granted, subject, ttl=3600)


TOKEN = token_for()


# Limits are not under test here either (tests/gateway/test_ratelimit.py): a plan no test
# in this file comes near.
ROOMY_PLAN = TenantLimits(
    tenant="t_proxytests",
    plan="roomy",
    rate_per_second=1e6,
    burst=1_000_000,
    daily_quota=10**12,
    max_items_per_request=10_000,
    allowed_models=(),
)


@contextlib.asynccontextmanager
async def running(settings: GatewaySettings, *, background: bool = False) -> AsyncIterator[Gateway]:
    """The gateway, its lifespan started. Without `background`, no probe or poll runs on
    its own: each upstream sees the proxied requests only, and a test that needs a
    probe round runs it (`gw.state["upstreams"].poll()`)."""
    app = create_app(
        settings,
        verifier=tokens.static_verifier,
        background=background,
        plans=FixedPlans(ROOMY_PLAN),
    )
    async with started(app, GatewayState) as gateway:
        transport = httpx.ASGITransport(app=gateway.app)
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://gw",
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as http:
            yield Gateway(gateway.app, gateway.state, http)


@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamServer]:
    async with UpstreamServer() as server:
        yield server


@pytest.fixture
async def upstreams() -> AsyncIterator[dict[str, UpstreamServer]]:
    """One real server per upstream, so a test can tell which one a request reached."""
    async with contextlib.AsyncExitStack() as stack:
        yield {name: await stack.enter_async_context(UpstreamServer()) for name in UPSTREAMS}


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedUpstream]:
    async with ScriptedUpstream() as server:
        yield server


def urls_of(servers: Mapping[str, UpstreamServer]) -> dict[str, str]:
    return {name: server.url for name, server in servers.items()}


def assert_problem(
    response: httpx.Response, status: int, slug: str, *, absent: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A problem+json from the gateway itself, with none of the `absent` texts in it."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"] == PROBLEM_BASE + slug
    assert body["status"] == status
    assert isinstance(body["title"], str)
    assert body["title"]
    assert body["request_id"] == response.headers["x-request-id"]
    assert "trace_id" in body
    for text in absent:
        assert text not in response.text, text
        assert all(text not in value for value in response.headers.values()), text
    return body


def retry_after(response: httpx.Response) -> int:
    value = response.headers["retry-after"]
    assert value.isdigit(), value
    return int(value)


# -- routing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "query", "name"),
    [
        ("POST", "/v1/models/x/predict", "explain=true&top_k=3", "inference"),
        ("GET", "/v2/models", "", "inference"),
        ("GET", "/v2/models/iris/versions/2", "verbose=1", "inference"),
        ("POST", "/v1/events/transactions", "", "features"),
        ("GET", "/v1/usage", "from=2026-01-01&to=2026-02-01&tenant=a%20b", "analytics"),
        ("POST", "/v1/auth/token", "", "auth"),
    ],
)
async def test_a_route_reaches_its_upstream_with_path_and_query_preserved(
    upstreams: dict[str, UpstreamServer], method: str, path: str, query: str, name: str
) -> None:
    body = b'{"inputs": [1, 2, 3]}' if method == "POST" else b""
    async with running(gateway_settings(urls_of(upstreams))) as gw:
        response = await gw.request(method, path + ("?" + query if query else ""), content=body)

    assert response.status_code == 200
    assert response.json() == {"path": path, "method": method, "ok": True}
    (seen,) = upstreams[name].requests
    assert (seen.method, seen.path, seen.query, seen.body) == (method, path, query, body)
    assert {other: s.calls() for other, s in upstreams.items() if other != name} == dict.fromkeys(
        set(UPSTREAMS) - {name}, 0
    )


@pytest.mark.parametrize(
    "raw_path",
    [
        "/v1/models/a%20b/predict",
        "/v1/models/a%2Fb/predict",
        "/v1/models/a%3Fb/predict",
        "/v1/models/caf%C3%A9/predict",
        "/v1/models/x%0D%0AX-Injected:%20yes/predict",
        # Decoded, this is a whole second request smuggled onto the upstream connection.
        "/v1/models/x%20HTTP/1.1%0D%0AHost:%20i%0D%0A%0D%0AGET%20/v1/admin/models%20HTTP/1.1"
        "%0D%0AX-Injected:%20yes",
    ],
)
async def test_an_escaped_path_is_forwarded_as_the_client_sent_it(
    upstream: UpstreamServer, raw_path: str
) -> None:
    """The upstream gets the path as escaped on the wire, never the decoded one: a
    decoded space, `?`, `/` or CR LF would change (or split) the upstream request."""
    async with running(gateway_settings(upstream.url)) as gw:
        response = await gw.post(raw_path + "?k=v", content=b"{}")

    assert response.status_code == 200, response.text
    (seen,) = upstream.requests
    assert (seen.path, seen.query) == (raw_path, "k=v")
    assert "x-injected" not in seen.headers


async def test_an_unknown_path_is_a_404_problem_and_reaches_no_upstream(
    upstreams: dict[str, UpstreamServer],
) -> None:
    async with running(gateway_settings(urls_of(upstreams))) as gw:
        get = await gw.get("/v1/nope")
        post = await gw.post("/v1/nope/deeper?x=1", content=b"{}")
        near_miss = await gw.get("/v2x/models")

    for response in (get, post, near_miss):
        assert_problem(response, 404, "not-found")
    assert sum(server.calls() for server in upstreams.values()) == 0


async def test_status_route_answers_from_the_last_probe_and_never_calls_upstream(
    upstreams: dict[str, UpstreamServer],
) -> None:
    """A public route anyone may call in a loop: it reads what the background probe
    found, so the upstream sees one probe per round, whatever the traffic and headers."""
    async with running(gateway_settings(urls_of(upstreams))) as gw:
        before = await gw.get("/v1/status/inference")
        await gw.state["upstreams"].poll()
        responses = [
            await gw.get("/v1/status/inference", headers=headers)
            for headers in ({}, {"x-request-timeout-ms": "1"}, {"Authorization": "Bearer junk"})
            for _ in range(20)
        ]
        unknown = await gw.get("/v1/status/payments")

    assert before.status_code == 503
    assert before.json() == {"upstream": "inference", "status": "unknown", "breaker": "closed"}
    for response in responses:
        assert response.status_code == 200, response.text
        body = response.json()
        assert body.pop("checked_seconds_ago") >= 0
        assert body == {
            "upstream": "inference",
            "status": "up",
            "breaker": "closed",
            "http_status": 200,
        }
    assert_problem(unknown, 404, "not-found")
    # One probe round: one /readyz per upstream, and not one call for the 60 requests.
    for server in upstreams.values():
        assert [(r.method, r.path) for r in server.requests] == [("GET", "/readyz")]


async def test_status_route_answers_405_with_allow_to_other_methods(
    upstreams: dict[str, UpstreamServer],
) -> None:
    async with running(gateway_settings(urls_of(upstreams))) as gw:
        response = await gw.post("/v1/status/inference", content=b"{}")

    assert_problem(response, 405, "method-not-allowed")
    assert response.headers["allow"] == "GET"
    assert sum(server.calls() for server in upstreams.values()) == 0


# -- headers -------------------------------------------------------------------------------


HOP_BY_HOP_REQUEST = {
    "Connection": "keep-alive, X-Secret-Hop",
    "X-Secret-Hop": "1",
    "Keep-Alive": "timeout=5, max=1000",
    "TE": "trailers",
    "Trailer": "X-Checksum",
    "Upgrade": "websocket",
    "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
    "Proxy-Connection": "keep-alive",
}


async def test_hop_by_hop_request_headers_stay_behind_and_end_to_end_ones_go_on(
    upstream: UpstreamServer,
) -> None:
    headers = {
        **HOP_BY_HOP_REQUEST,
        "Content-Type": "application/json",
        "X-Tenant-Hint": "acme",
        # Set by this hop, never believed from the client.
        "X-Forwarded-For": "203.0.113.9",
        "X-Request-Timeout-Ms": "999999",
    }
    async with running(gateway_settings(upstream.url)) as gw:
        response = await gw.post("/v1/models/x/predict", content=b'{"a": 1}', headers=headers)

    assert response.status_code == 200
    (seen,) = upstream.requests
    sent = {name.lower() for name, _ in seen.raw_headers}
    assert not sent & {name.lower() for name in HOP_BY_HOP_REQUEST}, sent
    # The caller's verified token goes on (the client's default header here).
    assert seen.header_values("authorization") == [f"Bearer {TOKEN}"]
    assert seen.header_values("content-type") == ["application/json"]
    assert seen.header_values("x-tenant-hint") == ["acme"]
    assert seen.header_values("x-request-id") == [response.headers["x-request-id"]]
    assert seen.header_values("x-forwarded-for") == ["127.0.0.1"]  # the ASGI client
    (budget,) = seen.header_values("x-request-timeout-ms")
    assert budget.isdigit()
    assert 1 <= int(budget) <= 2000  # what is left of the gateway's deadline
    assert len(seen.header_values("host")) == 1
    assert seen.header_values("content-length") == ["8"]
    assert seen.body == b'{"a": 1}'


async def test_hop_by_hop_response_headers_stay_behind(scripted: ScriptedUpstream) -> None:
    body = b'{"score": 0.93, "label": "fraud"}'
    scripted.reply = Reply(
        200,
        [
            ("Content-Type", "application/json"),
            ("X-Narthex-Model-Version", "7"),
            ("Connection", "keep-alive"),
            ("Keep-Alive", "timeout=5, max=100"),
            ("Server", "secret-upstream/1.2"),
            ("Transfer-Encoding", "chunked"),
            ("Proxy-Authenticate", "Basic"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
        ],
        body,
        chunked=True,
    )
    async with running(gateway_settings(scripted.url)) as gw:
        response = await gw.post("/v1/models/x/predict", content=b"{}")

    assert response.status_code == 200
    assert response.content == body
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-narthex-model-version"] == "7"
    assert response.headers["content-length"] == str(len(body))
    assert response.headers.get_list("set-cookie") == ["a=1", "b=2"]
    for name in ("connection", "keep-alive", "transfer-encoding", "server", "proxy-authenticate"):
        assert name not in response.headers, name
    assert "secret-upstream" not in str(response.headers)


async def test_headers_the_upstreams_connection_header_names_stay_behind(
    scripted: ScriptedUpstream,
) -> None:
    scripted.reply = Reply(
        200,
        [
            ("Content-Type", "application/json"),
            ("Connection", "keep-alive, X-Upstream-Hop"),
            ("X-Upstream-Hop", "internal-only"),
            ("X-Narthex-Model-Version", "7"),
        ],
    )
    async with running(gateway_settings(scripted.url)) as gw:
        response = await gw.get("/v2/models")

    assert response.status_code == 200
    assert "x-upstream-hop" not in response.headers
    assert response.headers["x-narthex-model-version"] == "7"


@pytest.mark.parametrize(
    "incoming",
    ["has spaces in it 123", "x" * 300, "short", "semi;colon;id-0123", "-leading-dash-123"],
)
async def test_a_malformed_request_id_is_replaced(upstream: UpstreamServer, incoming: str) -> None:
    async with running(gateway_settings(upstream.url)) as gw:
        response = await gw.get("/v2/models", headers={"X-Request-ID": incoming})

    assert response.status_code == 200
    issued = response.headers["x-request-id"]
    assert issued != incoming
    assert REQUEST_ID.fullmatch(issued)
    assert upstream.requests[0].header_values("x-request-id") == [issued]


async def test_a_well_formed_request_id_is_kept_and_forwarded(upstream: UpstreamServer) -> None:
    incoming = "req-2026.11.23:abcdef_0123"
    async with running(gateway_settings(upstream.url)) as gw:
        ok = await gw.get("/v2/models", headers={"X-Request-ID": incoming})
        upstream.behave(None, status=500)
        failed = await gw.post("/v1/models/x/predict", headers={"X-Request-ID": incoming})

    assert ok.headers["x-request-id"] == incoming
    assert [r.header_values("x-request-id") for r in upstream.requests] == [[incoming]] * 2
    assert assert_problem(failed, 502, "bad-gateway")["request_id"] == incoming


# -- the body cap --------------------------------------------------------------------------


async def chunks(total: int, size: int = 300, body: bytes | None = None) -> AsyncIterator[bytes]:
    """`total` bytes (of `body`, or z's) as an async iterator: httpx sends it chunked,
    without Content-Length."""
    content = b"z" * total if body is None else body
    for start in range(0, total, size):
        yield content[start : start + size]


def events_body(size: int) -> bytes:
    """A limited route's JSON body (one event, a long string) of exactly `size` bytes."""
    frame = b'{"events":[""]}'
    return frame[:12] + b"z" * (size - len(frame)) + frame[12:]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_of_exactly_the_cap_passes(upstream: UpstreamServer, framing: str) -> None:
    body = events_body(MAX_BODY)
    async with running(gateway_settings(upstream.url)) as gw:
        content = body if framing == "content-length" else chunks(MAX_BODY, body=body)
        response = await gw.post(
            "/v1/events/transactions", content=content, headers={"content-type": "application/json"}
        )

    assert response.status_code == 200
    (seen,) = upstream.requests
    assert seen.body == body
    assert seen.header_values("content-length") == [str(MAX_BODY)]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_over_the_cap_is_413_and_never_sent(
    upstream: UpstreamServer, framing: str
) -> None:
    async with running(gateway_settings(upstream.url)) as gw:
        content = b"z" * (MAX_BODY + 1) if framing == "content-length" else chunks(MAX_BODY + 1)
        response = await gw.post("/v1/events/transactions", content=content)

    assert_problem(response, 413, "payload-too-large")
    assert upstream.calls() == 0


async def test_a_non_numeric_content_length_is_400(upstream: UpstreamServer) -> None:
    """httpx will not send a bad Content-Length, so the ASGI scope is built by hand."""
    async with running(gateway_settings(upstream.url)) as gw:
        start, body = await call_raw(
            gw,
            "POST",
            b"/v1/models/x/predict",
            headers=[(b"content-length", b"12abc")],
            body=b"hello",
        )

    assert start["status"] == 400
    assert (b"content-type", b"application/problem+json") in start["headers"]
    assert b"/problems/bad-request" in body["body"]
    assert upstream.calls() == 0


async def call_raw(
    gw: Gateway,
    method: str,
    path: bytes,
    query: bytes = b"",
    headers: Sequence[tuple[bytes, bytes]] = (),
    body: bytes = b"",
) -> list[Message]:
    """One request with the exact raw path, query and headers (httpx would re-encode or
    refuse them), straight into the app; the messages it sent back."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path.decode("latin-1"),
        "raw_path": path,
        "query_string": query,
        "root_path": "",
        "headers": [
            (b"host", b"gw"),
            *headers,
            (b"authorization", f"Bearer {TOKEN}".encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("gw", 80),
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    async with asyncio.timeout(BOUND):
        await gw.app(scope, receive, send)
    return sent


# -- upstream failures ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "headers", "expected", "slug", "retry"),
    [
        (500, [], 502, "bad-gateway", None),
        (502, [], 502, "bad-gateway", None),
        # Without Retry-After a 503 is a failure, not backpressure: not relayed.
        (503, [], 503, "unavailable", 1),
        (503, [("Retry-After", "soon")], 503, "unavailable", 1),
        (504, [], 504, "upstream-timeout", None),
    ],
)
async def test_an_upstream_5xx_becomes_the_gateways_own_problem(
    scripted: ScriptedUpstream,
    status: int,
    headers: list[tuple[str, str]],
    expected: int,
    slug: str,
    retry: int | None,
) -> None:
    scripted.reply = Reply(
        status,
        [("Content-Type", "text/plain"), ("X-Backend-Host", "10.9.8.7:9000"), *headers],
        f"{SECRET}: Traceback (most recent call last) at 10.9.8.7:9000".encode(),
    )
    async with running(gateway_settings(scripted.url)) as gw:
        response = await gw.post("/v1/models/x/predict", content=b"{}")

    assert_problem(
        response, expected, slug, absent=(SECRET, "Traceback", "10.9.8.7", f":{scripted.port}")
    )
    assert "x-backend-host" not in response.headers
    if retry is not None:
        assert retry_after(response) == retry
    assert len(scripted.requests) == 1  # a POST answered 5xx is not retried


async def test_a_problems_trace_id_is_the_trace_the_upstream_call_belonged_to(
    scripted: ScriptedUpstream,
) -> None:
    scripted.reply = Reply(500, body=SECRET.encode())
    caller = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    async with running(gateway_settings(scripted.url, tracing=True)) as gw:
        response = await gw.post(
            "/v1/models/x/predict", content=b"{}", headers={"traceparent": caller}
        )

    body = assert_problem(response, 502, "bad-gateway", absent=(SECRET,))
    (seen,) = scripted.requests
    (traceparent,) = seen.header_values("traceparent")
    _, trace_id, span_id, _ = traceparent.split("-")
    # The caller's trace continues through the gateway, in a span of the gateway's own.
    assert body["trace_id"] == trace_id == "ab" * 16
    assert span_id != "cd" * 8


async def test_a_slow_upstream_is_a_504_with_retry_after(upstream: UpstreamServer) -> None:
    upstream.behave(None, delay=5.0)
    settings = gateway_settings(upstream.url, upstream_try_timeout=0.2, upstream_deadline=0.5)
    async with running(settings) as gw:
        start = time.monotonic()
        response = await gw.get("/v1/admin/models")
        elapsed = time.monotonic() - start

    assert_problem(response, 504, "upstream-timeout", absent=(f":{upstream.port}",))
    assert retry_after(response) >= 1
    assert elapsed < 5.0  # cut by the deadline, not answered by the upstream
    assert 1 <= upstream.calls() <= 3


async def test_nothing_listening_is_a_503_with_retry_after() -> None:
    with refusing_port() as port:
        async with running(gateway_settings(f"http://127.0.0.1:{port}")) as gw:
            response = await gw.get("/v1/admin/models")
    assert_problem(response, 503, "upstream-unavailable", absent=(f":{port}",))
    assert retry_after(response) >= 1


async def test_the_breaker_opens_after_fail_max_and_spares_the_upstream(
    scripted: ScriptedUpstream, upstream: UpstreamServer
) -> None:
    scripted.reply = Reply(500, body=SECRET.encode())
    urls = {**dict.fromkeys(UPSTREAMS, upstream.url), "inference": scripted.url}
    settings = gateway_settings(urls, breaker_fail_max=2, upstream_retries=False)
    async with running(settings) as gw:
        failures = [await gw.post("/v1/models/x/predict", content=b"{}") for _ in range(2)]
        opened = [await gw.post("/v1/models/x/predict", content=b"{}") for _ in range(3)]
        proxied = len(scripted.requests)
        await gw.state["upstreams"].poll()
        ready = await gw.get("/readyz")
        status = await gw.get("/v1/status/inference")

    for response in failures:
        assert_problem(response, 502, "bad-gateway", absent=(SECRET,))
    for response in opened:
        assert_problem(response, 503, "circuit-open", absent=(SECRET,))
        assert retry_after(response) >= 1
    assert proxied == 2  # nothing reached it once the breaker was open
    # The gateway stays in rotation: its other routes still work, and every replica
    # shares this upstream's trouble alike. The report says what is wrong.
    assert ready.status_code == 200
    inference = ready.json()["checks"]["inference"]
    assert inference.pop("checked_seconds_ago") >= 0
    assert inference == {"status": "down", "required": False, "breaker": "open", "http_status": 500}
    assert status.status_code == 503
    assert status.json()["breaker"] == "open"
    assert SECRET not in status.text


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (503, [("Retry-After", "7")]),
        (503, [("Retry-After", "Wed, 21 Oct 2065 07:28:00 GMT")]),
        (429, [("Retry-After", "3")]),
        (429, []),
    ],
)
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_backpressure_passes_through_unretried_and_never_opens_the_breaker(
    scripted: ScriptedUpstream, status: int, headers: list[tuple[str, str]], method: str
) -> None:
    """Inference sheds load with 503 + Retry-After (429 from a limiter): an answer shaped
    for the client, relayed as sent. It is not a failure: a flood from one tenant must
    not open the breaker that every tenant's requests go through."""
    body = b'{"type": "https://narthex.dev/problems/overloaded", "status": 503}'
    scripted.reply = Reply(
        status,
        [("Content-Type", "application/problem+json"), ("Connection", "keep-alive"), *headers],
        body,
    )
    settings = gateway_settings(scripted.url, breaker_fail_max=1, upstream_max_attempts=3)
    async with running(settings) as gw:
        responses = [await gw.request(method, "/v2/models/x/infer") for _ in range(5)]
        breaker = gw.state["clients"]["inference"].breaker.state

    for response in responses:
        assert response.status_code == status
        assert response.content == body
        assert response.headers["content-type"] == "application/problem+json"
        for name, value in headers:
            assert response.headers[name] == value
        assert "connection" not in response.headers
    assert len(scripted.requests) == 5  # one try each: never retried, even a GET
    assert breaker == "closed"


async def test_a_503_without_retry_after_still_counts_against_the_breaker(
    scripted: ScriptedUpstream,
) -> None:
    scripted.reply = Reply(503, body=SECRET.encode())
    settings = gateway_settings(scripted.url, breaker_fail_max=1, upstream_retries=False)
    async with running(settings) as gw:
        failed = await gw.post("/v1/models/x/predict", content=b"{}")
        refused = await gw.post("/v1/models/x/predict", content=b"{}")

    assert_problem(failed, 503, "unavailable", absent=(SECRET,))
    assert_problem(refused, 503, "circuit-open")
    assert len(scripted.requests) == 1


async def test_a_callers_own_deadline_cuts_its_request_and_never_the_breaker(
    upstream: UpstreamServer,
) -> None:
    """`x-request-timeout-ms: 1` from anyone, on any route: the caller gets its 504, at
    the floor rather than at 1 ms, and the breaker every tenant shares never moves."""
    upstream.behave(None, delay=0.4)
    settings = gateway_settings(upstream.url, breaker_fail_max=1, deadline_floor_ms=100)
    async with running(settings) as gw:
        cut = [
            await gw.request(method, path, headers={"x-request-timeout-ms": "1"})
            for method, path in [("GET", "/v1/admin/models"), ("POST", "/v1/models/x/predict")] * 3
        ]
        states = {name: c.breaker.state for name, c in gw.state["clients"].items()}
        failures = gw.state["clients"]["inference"].breaker.fail_counter
        upstream.behave(None)
        served = await gw.get("/v1/admin/models")

    for response in cut:
        assert_problem(response, 504, "upstream-timeout")
    assert states == dict.fromkeys(UPSTREAMS, "closed")
    assert failures == 0
    assert served.status_code == 200
    # The upstream was told the floor, not the 1 ms the client asked for.
    budgets = [int(r.header_values("x-request-timeout-ms")[0]) for r in upstream.requests]
    assert all(50 <= budget <= 100 for budget in budgets[:-1]), budgets


async def test_a_try_cut_by_the_upstreams_own_try_timeout_still_counts(
    upstream: UpstreamServer,
) -> None:
    """The other side of the rule: no caller deadline, the gateway's own try timeout
    ends the try, so the upstream is slow and that counts."""
    upstream.behave(None, delay=0.4)
    settings = gateway_settings(
        upstream.url, breaker_fail_max=1, upstream_try_timeout=0.1, upstream_retries=False
    )
    async with running(settings) as gw:
        slow = await gw.get("/v1/admin/models")
        refused = await gw.get("/v1/admin/models")

    assert_problem(slow, 504, "upstream-timeout")
    assert_problem(refused, 503, "circuit-open")


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (404, b'{"detail": "no model named x"}'),
        (422, b'{"detail": [{"loc": ["body", "inputs"], "msg": "Field required"}]}'),
    ],
)
async def test_an_upstream_4xx_passes_through_unchanged(
    scripted: ScriptedUpstream, status: int, body: bytes
) -> None:
    scripted.reply = Reply(status, [("Content-Type", "application/json")], body)
    # A 4xx is the client's fault: even with fail_max=1 it never opens the breaker.
    async with running(gateway_settings(scripted.url, breaker_fail_max=1)) as gw:
        responses = [await gw.post("/v1/models/x/predict", content=b"{}") for _ in range(3)]

    for response in responses:
        assert response.status_code == status
        assert response.content == body
        assert response.headers["content-type"] == "application/json"
    assert len(scripted.requests) == 3


# -- retries -------------------------------------------------------------------------------


async def test_a_post_is_not_retried_once_sent(upstream: UpstreamServer) -> None:
    upstream.behave("/v1/models/x/predict", drop=True)
    async with running(gateway_settings(upstream.url)) as gw:
        response = await gw.post("/v1/models/x/predict", content=b"{}")

    assert_problem(response, 503, "upstream-unavailable")
    assert upstream.calls("/v1/models/x/predict") == 1


async def test_a_get_is_retried(upstream: UpstreamServer) -> None:
    upstream.behave("/v2/models", drop=True, times=2)
    async with running(gateway_settings(upstream.url)) as gw:
        response = await gw.get("/v2/models")

    assert response.status_code == 200
    assert upstream.calls("/v2/models") == 3


# -- readiness and metrics -----------------------------------------------------------------


async def test_readyz_is_200_naming_each_upstream_when_all_are_up(
    upstream: UpstreamServer,
) -> None:
    async with running(gateway_settings(upstream.url)) as gw:
        await gw.state["upstreams"].poll()
        responses = [await gw.get("/readyz") for _ in range(10)]

    for response in responses:
        assert response.status_code == 200
        report = response.json()
        assert report["status"] == "ready"
        assert report["checks"]["signing_keys"] == {"status": "up", "keys": 1}
        for name in UPSTREAMS:
            check = report["checks"][name]
            assert check.pop("checked_seconds_ago") >= 0
            assert check == {
                "status": "up",
                "required": False,
                "breaker": "closed",
                "http_status": 200,
            }
    assert upstream.calls("/readyz") == 4  # the one probe round, not one per /readyz


async def test_an_upstream_down_is_reported_and_the_gateway_stays_ready(
    upstreams: dict[str, UpstreamServer],
) -> None:
    with refusing_port() as port:
        urls = {**urls_of(upstreams), "features": f"http://127.0.0.1:{port}"}
        async with running(gateway_settings(urls)) as gw:
            await gw.state["upstreams"].poll()
            response = await gw.get("/readyz")
            down = await gw.get("/v1/status/features")
            up = await gw.get("/v1/status/analytics")

    assert response.status_code == 200
    report = response.json()
    assert report["status"] == "ready"
    features = report["checks"]["features"]
    assert (features["status"], features["required"], features["breaker"]) == (
        "down",
        False,
        "closed",
    )
    for name in ("auth", "inference", "analytics"):
        assert report["checks"][name]["status"] == "up"
    assert down.status_code == 503
    body = down.json()
    assert (body["status"], body["breaker"], body["error"]) == ("down", "closed", "ConnectError")
    assert str(port) not in down.text
    assert up.status_code == 200


async def test_readyz_needs_the_signing_keys(upstream: UpstreamServer) -> None:
    """Without keys no token can be checked: that replica is not ready. The background
    round that loads them runs at start-up; here auth serves no usable JWKS."""
    app = create_app(gateway_settings(upstream.url), background=True)
    async with (
        started(app, GatewayState) as gateway,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=gateway.app), base_url="http://gw"
        ) as http,
    ):
        response = await http.get("/readyz")

    assert response.status_code == 503
    report = response.json()
    assert report["checks"]["signing_keys"] == {"status": "down", "keys": 0}
    assert report["checks"]["inference"]["status"] == "up"  # probed at start-up, too
    assert upstream.calls("/.well-known/jwks.json") >= 1


def request_counts(metrics_text: str) -> Iterator[tuple[dict[str, str], float]]:
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "http_requests":
            for sample in family.samples:
                if sample.name == "http_requests_total":
                    yield sample.labels, sample.value


async def test_metrics_label_proxied_requests_by_route_prefix_not_raw_path(
    upstream: UpstreamServer,
) -> None:
    async with running(gateway_settings(upstream.url)) as gw:
        await gw.post("/v1/models/x/predict", content=b"{}")
        await gw.get("/v1/models/y/predict?top=1")
        await gw.get("/v2/models/iris-1234")
        await gw.get("/v1/nope/abc")
        metrics = await gw.get("/metrics")

    text = metrics.text
    for raw in ("/v1/models/x", "/v1/models/y", "/v2/models/iris-1234", "/v1/nope", "top=1"):
        assert raw not in text, raw
    counts = {
        (labels["method"], labels["route"], labels["status"]): value
        for labels, value in request_counts(text)
    }
    assert counts[("POST", "/v1/models", "200")] == 1
    assert counts[("GET", "/v1/models", "200")] == 1
    assert counts[("GET", "/v2", "200")] == 1
    assert counts[("GET", "unmatched", "404")] == 1


async def test_api_keys_reach_only_the_token_exchange(upstreams: dict[str, UpstreamServer]) -> None:
    key = "nx_dev_abcdefgh12345678_" + "A" * 40
    async with running(gateway_settings(urls_of(upstreams))) as gw:
        exchanged = await gw.post("/v1/auth/token", headers={"X-API-Key": key})
        proxied = await gw.get("/v1/models", headers={"X-Request-ID": "no-key-inside-0001"})
    assert exchanged.status_code == 200
    assert proxied.status_code == 200
    (token_call,) = upstreams["auth"].requests
    assert token_call.header_values("x-api-key") == [key]
    (model_call,) = upstreams["inference"].requests
    assert model_call.header_values("x-api-key") == []
    assert model_call.header_values("authorization") == [f"Bearer {TOKEN}"]


# -- authorization -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/v1/admin/tenants",
        "/v1/admin/plans",
        "/v1/admin/keys/k1",
        "/v1/admin/signing-keys/rotate",
        "/v1/admin/audit",
        "/v1/admin/models/m/load",
        "/v1/admin/usage",
        "/v1/admin/drift",
    ],
)
async def test_an_admin_route_needs_the_admin_scope_as_well_as_the_role(
    upstreams: dict[str, UpstreamServer], path: str
) -> None:
    narrowed = token_for(granted=["inference", "usage"])  # narrowed by the token endpoint
    async with running(gateway_settings(urls_of(upstreams))) as gw:
        refused = await gw.get(path, headers={"Authorization": f"Bearer {narrowed}"})
        quota = await gw.get(
            "/v1/quota?tenant=t_other", headers={"Authorization": f"Bearer {narrowed}"}
        )
        full = await gw.get(path)  # the client's default token: role and scope

    assert_problem(refused, 403, "forbidden")
    assert "admin scope" in refused.json()["detail"]
    assert_problem(quota, 403, "forbidden")  # another tenant's quota is admin business too
    assert full.status_code == 200
    assert sum(server.calls() for server in upstreams.values()) == 1


# -- the response side: addresses, sizes, cached public answers -------------------------------


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("{origin}/v2/models/x/versions/2", "/v2/models/x/versions/2"),
        ("{origin}/v1/keys/k1?page=2", "/v1/keys/k1?page=2"),
        ("//127.0.0.1:{port}/v1/keys/k1", "/v1/keys/k1"),
        ("HTTP://127.0.0.1:{port}/v1/x", "/v1/x"),
        ("/v1/keys/k1", "/v1/keys/k1"),  # relative: no address in it
        ("versions/2", "versions/2"),
        ("http://10.0.3.7:8003/v1/keys/k1", None),  # another internal address: dropped
        ("http://inference.narthex.svc.cluster.local/v2", None),
        ("https://127.0.0.1:{port}/v1/x", None),  # not the upstream's own origin
        ("http://127.0.0.1:1/v1/x", None),
        ("http://[::1:bad/x", None),
    ],
)
async def test_an_upstream_location_never_names_an_internal_address(
    scripted: ScriptedUpstream, location: str, expected: str | None
) -> None:
    value = location.format(origin=scripted.url, port=scripted.port)
    scripted.reply = Reply(
        201,
        [
            ("Content-Type", "application/json"),
            ("Location", value),
            ("Content-Location", value),
        ],
    )
    async with running(gateway_settings(scripted.url)) as gw:
        response = await gw.post("/v1/keys", content=b"{}")

    assert response.status_code == 201
    assert response.headers.get_list("location") == ([] if expected is None else [expected])
    assert response.headers.get_list("content-location") == ([] if expected is None else [expected])
    assert f":{scripted.port}" not in str(response.headers)


async def test_an_oversized_upstream_answer_is_a_502_and_counts_against_the_breaker(
    scripted: ScriptedUpstream,
) -> None:
    scripted.reply = Reply(200, body=b"[" + b"1," * 1000 + b"1]")
    settings = gateway_settings(scripted.url, upstream_max_response_bytes=1024, breaker_fail_max=2)
    async with running(settings) as gw:
        answers = [await gw.get("/v1/admin/models") for _ in range(3)]

    assert_problem(answers[0], 502, "bad-gateway")
    assert_problem(answers[1], 502, "bad-gateway")
    assert_problem(answers[2], 503, "circuit-open")
    assert len(scripted.requests) == 2  # a GET, yet not retried: the same answer would come


@pytest.mark.parametrize(
    "query",
    [
        "q=caf\u00e9".encode(),  # raw UTF-8, not escaped by the client
        b"q=\xe9t\xe9",  # raw latin-1
        b"name=%C3%A9&x=1&x=2",
        b"a=b%26c&d=%2F%3F%23",
        b"q=\xff\xfe;k=v|w^",
    ],
)
async def test_a_query_string_is_forwarded_byte_for_byte(
    upstream: UpstreamServer, query: bytes
) -> None:
    async with running(gateway_settings(upstream.url)) as gw:
        start, _ = await call_raw(gw, "GET", b"/v2/models", query)

    assert start["status"] == 200
    (seen,) = upstream.requests
    assert seen.query.encode("latin-1") == query


async def test_the_signing_keys_are_fetched_once_per_period_whatever_the_traffic(
    upstreams: dict[str, UpstreamServer],
) -> None:
    async with running(gateway_settings(urls_of(upstreams), public_cache_seconds=60)) as gw:
        answers = await asyncio.gather(
            *(
                gw.get(
                    "/.well-known/jwks.json?bust=" + str(i),
                    headers={"X-Forwarded-For": f"10.0.0.{i}", "X-Pad": "p" * i},
                )
                for i in range(30)
            )
        )
        head = await gw.request("HEAD", "/.well-known/jwks.json")
        upstreams["auth"].behave(None, status=500)
        stale = await gw.get("/.well-known/jwks.json")

    assert {a.status_code for a in answers} == {200}
    assert {a.content for a in answers} == {answers[0].content}
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-length"] == str(len(answers[0].content))
    (fetch,) = upstreams["auth"].requests
    assert (fetch.method, fetch.path, fetch.query) == ("GET", "/.well-known/jwks.json", "")
    assert fetch.header_values("x-forwarded-for") == []
    assert stale.status_code == 200  # within its period: still the cached answer


async def test_a_tenant_holds_at_most_its_share_of_the_upstream_connections(
    upstream: UpstreamServer,
) -> None:
    """Against a slow upstream, one tenant's concurrency would take every pooled
    connection; past its cap its requests wait briefly for a slot of its own, then get
    429s, and another tenant is served meanwhile."""
    upstream.behave("/v1/models/slow/predict", delay=0.8)  # within the 1 s try timeout
    other = token_for("t_other", roles=["tenant"], granted=["inference"])
    settings = gateway_settings(upstream.url, tenant_max_in_flight=3, upstream_connect_timeout=0.2)
    async with running(settings) as gw:
        flood = [
            asyncio.create_task(gw.post("/v1/models/slow/predict", content=b"{}")) for _ in range(8)
        ]
        await upstream.wait_for_calls(3)
        bystander = await gw.post(
            "/v1/models/fast/predict", content=b"{}", headers={"Authorization": f"Bearer {other}"}
        )
        answers = await asyncio.gather(*flood)
        after = await gw.post("/v1/models/fast/predict", content=b"{}")

    codes = sorted(a.status_code for a in answers)
    assert codes == [200] * 3 + [429] * 5
    for refused in (a for a in answers if a.status_code == 429):
        assert_problem(refused, 429, "too-many-in-flight")
        assert retry_after(refused) == 1
    assert bystander.status_code == 200
    assert after.status_code == 200  # the slots were given back
    assert upstream.calls("/v1/models/slow/predict") == 3


async def test_a_tenant_briefly_past_its_cap_waits_for_its_slot_rather_than_refused(
    upstream: UpstreamServer,
) -> None:
    upstream.behave("/v1/models/x/predict", delay=0.05)
    settings = gateway_settings(upstream.url, tenant_max_in_flight=1, upstream_connect_timeout=5)
    async with running(settings) as gw:
        answers = await asyncio.gather(
            *(gw.post("/v1/models/x/predict", content=b"{}") for _ in range(4))
        )
    assert [a.status_code for a in answers] == [200] * 4
