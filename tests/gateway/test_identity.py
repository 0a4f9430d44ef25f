"""The gateway's Identity: which credentials it reads, how it caches API-key exchanges."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from narthex.common.apikeys import generate_api_key
from narthex.common.authn import MissingToken
from narthex.common.deadline import deadline
from narthex.common.errors import GatewayTimeout, InvalidCredentials, ServiceUnavailable
from narthex.common.http import ClientPolicy, ServiceClient
from narthex.common.tokens import InvalidToken
from narthex.gateway.errors import KeyInQuery, RateLimited
from narthex.gateway.identity import Identity
from narthex.gateway.ratelimit.guard import ClientGuard
from narthex.gateway.revocations import Revocations
from tests.support import tokens
from tests.support.delay import DelayProxy
from tests.support.redis import REDIS_URL, redis_scratch
from tests.support.scripted import Reply, ScriptedUpstream
from tests.support.upstream import refusing_port

API_KEY = str(generate_api_key("dev"))


def token(subject: str = "t_acme", ttl: int = 900, client_id: str | None = None) -> str:
    return tokens.token(["tenant"], ["inference"], subject, ttl=ttl, client_id=client_id)


def scope(headers: list[tuple[str, str]], query: str = "") -> dict[str, object]:
    return {
        "type": "http",
        "query_string": query.encode(),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
    }


def token_reply(value: str) -> Reply:
    return Reply(body=json.dumps({"access_token": value, "token_type": "Bearer"}).encode())


@pytest.fixture
async def auth() -> AsyncIterator[ScriptedUpstream]:
    async with ScriptedUpstream(token_reply(token())) as server:
        yield server


async def identity_for(
    url: str,
    *,
    revalidate_seconds: float = 30.0,
    refused_seconds: float = 5.0,
    **options: Any,
) -> tuple[Identity, ServiceClient]:
    client = ServiceClient("auth", url, ClientPolicy(try_timeout=1.0, deadline=2.0))
    identity = Identity(
        tokens.verifier(),
        client,
        revalidate_seconds=revalidate_seconds,
        refused_seconds=refused_seconds,
        **options,
    )
    return identity, client


async def test_a_bearer_jwt_is_verified_without_calling_auth(auth: ScriptedUpstream) -> None:
    identity, client = await identity_for(auth.url)
    async with client:
        principal = await identity.authenticate(scope([("Authorization", f"Bearer {token()}")]))
    assert principal.tenant == "t_acme"
    assert auth.requests == []


@pytest.mark.parametrize(
    "headers",
    [[("X-API-Key", API_KEY)], [("Authorization", f"Bearer {API_KEY}")]],
    ids=["x-api-key", "bearer-key"],
)
async def test_an_api_key_is_exchanged_once_and_cached(
    auth: ScriptedUpstream, headers: list[tuple[str, str]]
) -> None:
    identity, client = await identity_for(auth.url)
    async with client:
        principals = await asyncio.gather(
            *(identity.authenticate(scope(headers)) for _ in range(20))
        )
        await identity.authenticate(scope(headers))
    assert {p.tenant for p in principals} == {"t_acme"}
    assert len(auth.requests) == 1  # 21 requests, one exchange
    assert auth.requests[0].headers["x-api-key"] == API_KEY


async def test_the_exchange_is_redone_after_the_revalidation_period(
    auth: ScriptedUpstream,
) -> None:
    identity, client = await identity_for(auth.url, revalidate_seconds=0.2)
    async with client:
        await identity.authenticate(scope([("X-API-Key", API_KEY)]))
        await asyncio.sleep(0.3)
        await identity.authenticate(scope([("X-API-Key", API_KEY)]))
    assert len(auth.requests) == 2


async def test_a_refused_key_is_401_and_remembered_briefly() -> None:
    async with ScriptedUpstream(Reply(status=401, body=b"{}")) as auth:
        identity, client = await identity_for(auth.url, refused_seconds=60.0)
        async with client:
            for _ in range(5):
                with pytest.raises(InvalidCredentials):
                    await identity.authenticate(scope([("X-API-Key", API_KEY)]))
    assert len(auth.requests) == 1


async def test_auth_down_is_503_never_a_verdict_on_the_key() -> None:
    with refusing_port() as port:
        identity, client = await identity_for(f"http://127.0.0.1:{port}")
        async with client:
            with pytest.raises(ServiceUnavailable) as caught:
                await identity.authenticate(scope([("X-API-Key", API_KEY)]))
    assert caught.value.status == 503


async def test_auth_failing_is_503() -> None:
    async with ScriptedUpstream(Reply(status=500, body=b"boom")) as auth:
        identity, client = await identity_for(auth.url)
        async with client:
            with pytest.raises(ServiceUnavailable):
                await identity.authenticate(scope([("X-API-Key", API_KEY)]))


@pytest.mark.parametrize(
    "query",
    [
        f"api_key={API_KEY}",
        f"key={API_KEY}",
        f"x=1&apikey={API_KEY}",
        "access_token=abc",
        f"q={API_KEY.replace('_', '%5F')}",
    ],
)
async def test_credentials_in_the_query_string_are_refused(
    auth: ScriptedUpstream, query: str
) -> None:
    identity, client = await identity_for(auth.url)
    async with client:
        with pytest.raises(KeyInQuery) as caught:
            await identity.authenticate(scope([("X-API-Key", API_KEY)], query))
    assert caught.value.status == 401
    assert auth.requests == []


async def test_an_ordinary_query_string_is_fine(auth: ScriptedUpstream) -> None:
    identity, client = await identity_for(auth.url)
    async with client:
        principal = await identity.authenticate(
            scope([("Authorization", f"Bearer {token()}")], "limit=10&monkey=1")
        )
    assert principal.tenant == "t_acme"


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ([], MissingToken),
        ([("Authorization", "Basic dXNlcjpwYXNz")], MissingToken),
        ([("Authorization", "Bearer ")], MissingToken),
        ([("Authorization", f"Bearer {token()}"), ("X-API-Key", API_KEY)], InvalidToken),
        ([("X-API-Key", API_KEY), ("X-API-Key", API_KEY)], InvalidToken),
        ([("Authorization", "Bearer not.a.jwt")], InvalidToken),
    ],
    ids=["none", "basic", "empty-bearer", "two-kinds", "two-keys", "garbage"],
)
async def test_missing_ambiguous_or_bad_credentials_are_401(
    auth: ScriptedUpstream, headers: list[tuple[str, str]], error: type[Exception]
) -> None:
    identity, client = await identity_for(auth.url)
    async with client:
        with pytest.raises(error) as caught:
            await identity.authenticate(scope(headers))
    assert getattr(caught.value, "status", None) == 401
    assert auth.requests == []


# -- shared state a stranger or another tenant can reach -------------------------------------


def junk_key(i: int) -> str:
    return f"nx_dev_{i:016d}_" + "J" * 40


async def test_keys_new_to_the_gateway_pass_the_per_ip_guard_before_reaching_auth() -> None:
    """Guessing keys on any protected route costs what guessing at the token endpoint
    does: once the client's allowance is spent, junk keys never reach auth."""
    guard = ClientGuard("3/minute")
    async with ScriptedUpstream(Reply(status=401, body=b"{}")) as auth:
        identity, client = await identity_for(auth.url, guard=guard)
        async with client:
            refused = []
            for i in range(10):
                try:
                    await identity.authenticate(scope([("X-API-Key", junk_key(i))]))
                except (InvalidCredentials, RateLimited) as exc:
                    refused.append(type(exc))
    assert refused == [InvalidCredentials] * 3 + [RateLimited] * 7
    assert len(auth.requests) == 3


async def test_a_valid_cached_key_costs_nothing_against_the_guard(auth: ScriptedUpstream) -> None:
    guard = ClientGuard("1/minute")
    identity, client = await identity_for(auth.url, guard=guard, revalidate_seconds=0.001)
    async with client:
        for _ in range(20):  # the first exchange spends the client's one allowance...
            await identity.authenticate(scope([("X-API-Key", API_KEY)]))
        with pytest.raises(RateLimited):  # ...as a new key now shows
            await identity.authenticate(scope([("X-API-Key", junk_key(1))]))
        await asyncio.sleep(0.01)  # past the revalidation period: re-exchanged, unguarded
        principal = await identity.authenticate(scope([("X-API-Key", API_KEY)]))
    assert principal.tenant == "t_acme"
    assert len(auth.requests) >= 2


async def test_junk_keys_never_push_out_an_accepted_key(auth: ScriptedUpstream) -> None:
    identity, client = await identity_for(auth.url, max_refused=5)
    async with client:
        await identity.authenticate(scope([("X-API-Key", API_KEY)]))
        auth.reply = Reply(status=401, body=b"{}")
        for i in range(100):
            with pytest.raises(InvalidCredentials):
                await identity.authenticate(scope([("X-API-Key", junk_key(i))]))
        principal = await identity.authenticate(scope([("X-API-Key", API_KEY)]))
    assert principal.tenant == "t_acme"
    assert len(auth.requests) == 101  # the accepted key was answered from the cache


async def test_one_tenant_with_many_keys_pushes_out_only_its_own(auth: ScriptedUpstream) -> None:
    identity, client = await identity_for(auth.url, max_keys_per_tenant=3)
    async with client:
        await identity.authenticate(scope([("X-API-Key", API_KEY)]))  # t_acme's key
        auth.reply = token_reply(token("t_hostile"))
        hostile = [str(generate_api_key("dev")) for _ in range(50)]
        for key in hostile:
            assert (await identity.authenticate(scope([("X-API-Key", key)]))).tenant == (
                "t_hostile"
            )
        exchanged = len(auth.requests)
        acme = await identity.authenticate(scope([("X-API-Key", API_KEY)]))
        still_cached = len(auth.requests) == exchanged
        await identity.authenticate(scope([("X-API-Key", hostile[0])]))
        first_hostile_evicted = len(auth.requests) == exchanged + 1
    assert acme.tenant == "t_acme"
    assert still_cached
    assert first_hostile_evicted


async def test_a_callers_deadline_cuts_its_wait_but_not_the_exchange_others_share(
    auth: ScriptedUpstream,
) -> None:
    async with DelayProxy(auth.port, delay=0.3) as slow:
        identity, client = await identity_for(slow.url)
        async with client:
            with deadline(0.05), pytest.raises(GatewayTimeout):
                await identity.authenticate(scope([("X-API-Key", API_KEY)]))
            # The exchange went on without it, and its answer serves the next caller.
            principal = await identity.authenticate(scope([("X-API-Key", API_KEY)]))
    assert principal.tenant == "t_acme"
    assert len(auth.requests) == 1


def client_token(subject: str, client_id: str | None) -> str:
    return token(subject, client_id=client_id)


async def test_revoked_keys_and_disabled_tenants_are_refused_whatever_the_credential(
    auth: ScriptedUpstream,
) -> None:
    auth.reply = token_reply(client_token("t_acme", "keyofacme0000001"))
    identity, client = await identity_for(auth.url)
    revocations = identity.revocations = Revocations(client)
    async with client:
        minted = client_token("t_acme", "keyofacme0000001")
        other_key = client_token("t_acme", "keyofacme0000002")
        legacy = client_token("t_acme", None)  # minted before tokens named their key
        for credential in (("X-API-Key", API_KEY), ("Authorization", f"Bearer {minted}")):
            assert (await identity.authenticate(scope([credential]))).key_id == ("keyofacme0000001")

        revocations.keys = frozenset({"keyofacme0000001"})
        with pytest.raises(InvalidCredentials):
            await identity.authenticate(scope([("X-API-Key", API_KEY)]))
        with pytest.raises(InvalidToken):
            await identity.authenticate(scope([("Authorization", f"Bearer {minted}")]))
        for fine in (other_key, legacy):  # the tenant's other credentials still work
            await identity.authenticate(scope([("Authorization", f"Bearer {fine}")]))

        revocations.keys, revocations.tenants = frozenset(), frozenset({"t_acme"})
        for refused in (minted, other_key, legacy):
            with pytest.raises(InvalidToken):
                await identity.authenticate(scope([("Authorization", f"Bearer {refused}")]))
        with pytest.raises(InvalidCredentials):
            await identity.authenticate(scope([("X-API-Key", API_KEY)]))
        assert len(auth.requests) == 1  # all of it decided here, from the polled list


async def test_concurrent_first_uses_of_one_key_pass_the_guard_once(
    auth: ScriptedUpstream,
) -> None:
    """200 clients of one tenant starting together with its key: one exchange, one pass
    through the guard, however the requests interleave (the shared guard's count runs in
    a thread, so they do)."""
    async with redis_scratch() as scratch:
        guard = ClientGuard("1/minute", storage_uri=REDIS_URL, prefix=scratch.prefix)
        identity, client = await identity_for(auth.url, guard=guard)
        async with client:
            principals = await asyncio.gather(
                *(identity.authenticate(scope([("X-API-Key", API_KEY)])) for _ in range(200))
            )
    assert {p.tenant for p in principals} == {"t_acme"}
    assert len(auth.requests) == 1
