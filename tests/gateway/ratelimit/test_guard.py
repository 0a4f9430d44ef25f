"""The per-client-IP guard on unauthenticated routes, and the trusted-proxy-aware client IP."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from ipaddress import ip_address, ip_network
from typing import Any

import httpx
import pytest
from pydantic import AnyHttpUrl, ValidationError
from starlette.requests import Request

from narthex.gateway.clientip import (
    Network,
    client_ip,
    forwarded_chain,
    parse_address,
)
from narthex.gateway.main import create_app
from narthex.gateway.ratelimit.guard import guard_key
from narthex.gateway.resources import GatewayState
from narthex.gateway.routing import ROUTES
from narthex.gateway.settings import GatewaySettings
from narthex.testing.lifespan import started
from tests.support.redis import REDIS_URL, redis_scratch
from tests.support.upstream import UpstreamServer, refusing_port

TOKEN = "/v1/auth/token"
PROXIES = [ip_network("10.0.0.0/8"), ip_network("2001:db8:aa::/48")]
PROXY = "10.0.0.2"  # a load balancer in front of the gateway
CLIENT = "198.51.100.7"  # a client on the internet
OTHER = "203.0.113.9"


def scope(peer: str | None, *forwarded: str) -> dict[str, Any]:
    return {
        "type": "http",
        "client": (peer, 50_000) if peer is not None else None,
        "headers": [(b"x-forwarded-for", value.encode()) for value in forwarded],
    }


def resolve(peer: str | None, *forwarded: str, trusted: list[Network] = PROXIES) -> str:
    return client_ip(scope(peer, *forwarded), trusted)


# -- client_ip --------------------------------------------------------------------------------
def test_without_trusted_proxies_the_peer_is_the_client_whatever_xff_says() -> None:
    assert resolve(CLIENT, "1.2.3.4", trusted=[]) == CLIENT
    assert resolve(PROXY, "1.2.3.4", trusted=[]) == PROXY


def test_an_untrusted_peers_xff_is_never_believed() -> None:
    assert resolve(OTHER, CLIENT) == OTHER
    assert resolve(OTHER, f"{CLIENT}, 10.0.0.9") == OTHER  # naming a trusted hop changes nothing
    assert forwarded_chain(scope(OTHER, CLIENT), PROXIES) == [OTHER]


def test_a_trusted_proxys_xff_is_believed() -> None:
    assert resolve(PROXY, CLIENT) == CLIENT
    assert forwarded_chain(scope(PROXY, CLIENT), PROXIES) == [CLIENT, PROXY]


def test_the_rightmost_untrusted_entry_wins_and_spoofed_left_entries_are_ignored() -> None:
    # The client wrote "6.6.6.6, 7.7.7.7" itself; its proxy appended the client's real
    # address, then a second trusted hop appended the first one's.
    chain = f"6.6.6.6, 7.7.7.7, {CLIENT}, 10.1.1.1"
    assert resolve(PROXY, chain) == CLIENT
    assert forwarded_chain(scope(PROXY, chain), PROXIES) == [CLIENT, "10.1.1.1", PROXY]


def test_repeated_xff_headers_are_one_list() -> None:
    assert resolve(PROXY, "6.6.6.6", f"{CLIENT}, 10.1.1.1") == CLIENT
    assert resolve(PROXY, f"6.6.6.6, {CLIENT}", "10.1.1.1") == CLIENT


def test_a_chain_of_trusted_hops_only_ends_at_its_leftmost() -> None:
    assert resolve(PROXY, "10.9.9.9, 10.1.1.1") == "10.9.9.9"
    assert resolve(PROXY) == PROXY  # a trusted peer that forwards nothing
    assert resolve(PROXY, "") == PROXY


@pytest.mark.parametrize(
    ("forwarded", "client"),
    [
        # Garbage right of the trusted hop: the peer is as far back as we can believe.
        ("unknown", PROXY),
        (f"{CLIENT}, not-an-ip", PROXY),
        (f"{CLIENT}, 999.1.1.1", PROXY),
        (f"{CLIENT},,", PROXY),
        ("_hidden, 10.1.1.1", "10.1.1.1"),  # stops at the last trusted hop
        (f"{CLIENT}, garbage, 10.1.1.1", "10.1.1.1"),
        (f"garbage, {CLIENT}, 10.1.1.1", CLIENT),  # left of the client: never read
    ],
)
def test_a_malformed_entry_stops_the_walk(forwarded: str, client: str) -> None:
    assert resolve(PROXY, forwarded) == client


def test_ipv6_peers_and_entries() -> None:
    v6_client = "2a00:1450:4001::1"
    assert resolve("2001:db8:aa::5", v6_client) == v6_client
    assert resolve("2001:db8:aa::5", f"[{v6_client}]:443") == v6_client
    assert resolve("2001:db8:bb::5", CLIENT) == "2001:db8:bb::5"  # outside the trusted /48
    # A dual-stack listener reports IPv4 peers as IPv4-mapped IPv6.
    assert resolve("::ffff:10.0.0.2", CLIENT) == CLIENT
    assert resolve(PROXY, "2001:DB8:0:0::1") == "2001:db8::1"  # normalised


def test_a_request_without_a_peer_has_an_unknown_client() -> None:
    assert resolve(None, CLIENT) == "unknown"


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("198.51.100.7", "198.51.100.7"),
        (" 198.51.100.7 ", "198.51.100.7"),
        ("198.51.100.7:8080", "198.51.100.7"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1]:8080", "2001:db8::1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("", None),
        ("unknown", None),
        ("198.51.100.7:http", None),
        ("[2001:db8::1", None),
        ("[2001:db8::1]x", None),
        ("1.2.3", None),
        ("example.com", None),
    ],
)
def test_parse_address(text: str, address: str | None) -> None:
    parsed = parse_address(text)
    assert (str(parsed) if parsed else None) == address
    if address is not None:
        assert parsed == ip_address(address)


# -- settings ---------------------------------------------------------------------------------
def test_trusted_proxies_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NARTHEX_GATEWAY_TRUSTED_PROXIES", "10.0.0.0/8, 2001:db8::/32,192.0.2.1")
    assert GatewaySettings().trusted_proxies == [
        ip_network("10.0.0.0/8"),
        ip_network("2001:db8::/32"),
        ip_network("192.0.2.1/32"),
    ]
    monkeypatch.setenv("NARTHEX_GATEWAY_TRUSTED_PROXIES", '["172.16.0.0/12"]')
    assert GatewaySettings().trusted_proxies == [ip_network("172.16.0.0/12")]
    monkeypatch.setenv("NARTHEX_GATEWAY_TRUSTED_PROXIES", "")
    assert GatewaySettings().trusted_proxies == []


@pytest.mark.parametrize("value", ["10.0.0.0/33", "10.0.0.1/8", "proxy.internal"])
def test_a_bad_trusted_proxy_is_refused(value: str) -> None:
    with pytest.raises(ValidationError):
        GatewaySettings(trusted_proxies=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["many", "30/fortnight", "5/second;100/hour"])
def test_a_bad_limit_is_refused(value: str) -> None:
    with pytest.raises(ValidationError):
        GatewaySettings(token_exchange_limit=value)


def test_the_token_exchange_is_guarded_in_the_route_table() -> None:
    assert {route.prefix for route in ROUTES if route.guarded} == {TOKEN}
    # Guarded routes are the unauthenticated ones: a tenant's are the tenant limiter's.
    assert all(route.public for route in ROUTES if route.guarded)


# -- through the gateway ----------------------------------------------------------------------
@pytest.fixture
async def upstream() -> AsyncIterator[UpstreamServer]:
    async with UpstreamServer() as server:
        yield server


Connect = Callable[[str], httpx.AsyncClient]


@contextlib.asynccontextmanager
async def gateway(upstream: UpstreamServer, **settings: Any) -> AsyncIterator[Connect]:
    """The real gateway app; `connect(peer)` is a client whose socket peer is `peer`."""
    url = AnyHttpUrl(upstream.url)
    fields: dict[str, Any] = {
        "tracing": False,
        "auth_url": url,
        "features_url": url,
        "inference_url": url,
        "analytics_url": url,
        "token_exchange_limit": "3/minute",
        "trusted_proxies": PROXIES,
        **settings,
    }
    # No background probes: the upstream's counts are the proxied requests alone.
    app = create_app(GatewaySettings(**fields), background=False)
    async with started(app, GatewayState) as gw, contextlib.AsyncExitStack() as stack:

        def connect(peer: str) -> httpx.AsyncClient:
            transport = httpx.ASGITransport(app=gw.app, client=(peer, 50_000))
            client = httpx.AsyncClient(transport=transport, base_url="http://gw")
            stack.push_async_callback(client.aclose)
            return client

        yield connect


async def exchange(client: httpx.AsyncClient, forwarded: str | None = None) -> httpx.Response:
    headers = {"Authorization": "Bearer nx_test_key"}
    if forwarded is not None:
        headers["X-Forwarded-For"] = forwarded
    return await client.post(TOKEN, headers=headers)


def assert_guarded(response: httpx.Response, within: int = 60) -> None:
    assert response.status_code == 429
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["type"].endswith("/rate-limited")
    assert 1 <= int(response.headers["retry-after"]) <= within


async def test_one_ip_gets_its_limit_then_429_with_retry_after(upstream: UpstreamServer) -> None:
    async with gateway(upstream) as connect:
        client = connect(CLIENT)
        responses = [await exchange(client) for _ in range(4)]
    assert [r.status_code for r in responses[:3]] == [200, 200, 200]
    assert_guarded(responses[3])
    assert upstream.calls(TOKEN) == 3  # the refused one never left the gateway


async def test_the_window_moves_and_admits_again(upstream: UpstreamServer) -> None:
    async with gateway(upstream, token_exchange_limit="2/second") as connect:
        client = connect(CLIENT)
        assert [(await exchange(client)).status_code for _ in range(2)] == [200, 200]
        refused = await exchange(client)
        assert_guarded(refused, within=1)
        await asyncio.sleep(float(refused.headers["retry-after"]))
        assert (await exchange(client)).status_code == 200
    assert upstream.calls(TOKEN) == 3


async def test_clients_behind_a_trusted_proxy_are_counted_apart(upstream: UpstreamServer) -> None:
    async with gateway(upstream) as connect:
        proxy = connect(PROXY)
        first = [(await exchange(proxy, CLIENT)).status_code for _ in range(4)]
        second = [(await exchange(proxy, f"6.6.6.6, {OTHER}")).status_code for _ in range(3)]
        direct = (await exchange(connect(OTHER))).status_code
    assert first == [200, 200, 200, 429]
    assert second == [200, 200, 200]  # another client, though the same proxy connects
    assert direct == 429  # the same client, whichever way it comes in
    assert upstream.calls(TOKEN) == 6


async def test_a_spoofed_xff_from_an_untrusted_peer_does_not_escape(
    upstream: UpstreamServer,
) -> None:
    async with gateway(upstream) as connect:
        client = connect(OTHER)
        statuses = [(await exchange(client, f"192.0.2.{n}")).status_code for n in range(5)]
        also_spoofed = (await exchange(client, f"192.0.2.99, {PROXY}")).status_code
    assert statuses == [200, 200, 200, 429, 429]
    assert also_spoofed == 429
    assert upstream.calls(TOKEN) == 3


@pytest.mark.parametrize(
    ("client", "key"),
    [
        ("198.51.100.7", "198.51.100.7"),
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::ffff:10.0.0.1", "10.0.0.1"),  # a dual-stack listener's view of an IPv4 client
        ("unknown", "unknown"),
    ],
)
def test_an_ipv6_client_is_counted_by_its_64(client: str, key: str) -> None:
    assert guard_key(client) == key


async def test_addresses_of_one_ipv6_64_share_one_allowance(upstream: UpstreamServer) -> None:
    """A subscriber holds a whole /64: a new address per request must not buy a new
    allowance."""
    async with gateway(upstream) as connect:
        same = [(await exchange(connect(f"2001:db8:77:1::{n:x}"))).status_code for n in range(1, 6)]
        neighbour = (await exchange(connect("2001:db8:77:2::1"))).status_code
    assert same == [200, 200, 200, 429, 429]
    assert neighbour == 200
    assert upstream.calls(TOKEN) == 4


async def test_unguarded_routes_are_not_counted(upstream: UpstreamServer) -> None:
    async with gateway(upstream) as connect:
        client = connect(CLIENT)
        jwks = [(await client.get("/.well-known/jwks.json")).status_code for _ in range(5)]
        token = [(await exchange(client)).status_code for _ in range(3)]
    assert jwks == [200] * 5
    assert token == [200] * 3


async def test_the_upstream_sees_the_resolved_forwarded_chain(upstream: UpstreamServer) -> None:
    async with gateway(upstream, token_exchange_limit="100/minute") as connect:
        await exchange(connect(PROXY), f"6.6.6.6, {CLIENT}, 10.1.1.1")
        await exchange(connect(OTHER), f"6.6.6.6, {PROXY}")
        await exchange(connect(PROXY))
        await connect(CLIENT).get("/.well-known/jwks.json", headers={"X-Forwarded-For": "1.1.1.1"})
    seen = [r.header_values("x-forwarded-for") for r in upstream.requests]
    assert seen == [
        [f"{CLIENT}, 10.1.1.1, {PROXY}"],  # the spoofed left entry is gone, the peer appended
        [OTHER],  # an untrusted peer's chain is replaced by the peer
        [PROXY],
        # The signing keys are one cached answer for everyone, fetched on nobody's
        # behalf: no client's address (nor any other of its headers) goes with it.
        [],
    ]


async def test_replicas_share_the_count_in_redis(upstream: UpstreamServer) -> None:
    async with redis_scratch() as scratch:
        shared = {"redis_url": REDIS_URL, "ratelimit_prefix": scratch.prefix}
        async with gateway(upstream, **shared) as one, gateway(upstream, **shared) as two:
            statuses = [
                (await exchange(replica(CLIENT))).status_code
                for replica in (one, two, one, two, one)
            ]
            other = (await exchange(two(OTHER))).status_code
        keys = [key async for key in scratch.client.scan_iter(match=f"{scratch.prefix}:guard:*")]
    assert statuses == [200, 200, 200, 429, 429]
    assert other == 200
    assert keys  # under the gateway's own prefix


async def test_redis_down_falls_back_to_a_per_replica_count(upstream: UpstreamServer) -> None:
    with refusing_port() as port:
        async with gateway(upstream, redis_url=f"redis://127.0.0.1:{port}/0") as connect:
            client = connect(CLIENT)
            responses = [await exchange(client) for _ in range(4)]
    assert [r.status_code for r in responses[:3]] == [200, 200, 200]
    assert_guarded(responses[3])


async def test_the_apps_guard_keys_a_route_of_its_own_by_the_resolved_client() -> None:
    # The dashboard login (a FastAPI route) will use the same guard and key function.
    app = create_app(GatewaySettings(tracing=False, trusted_proxies=PROXIES), background=False)
    async with started(app, GatewayState) as gw:
        guard = gw.state["guard"]
    assert guard.key(Request(scope(PROXY, f"6.6.6.6, {CLIENT}"))) == CLIENT
    assert guard.key(Request(scope(OTHER, CLIENT))) == OTHER
