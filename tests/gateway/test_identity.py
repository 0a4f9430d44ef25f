"""The gateway's Identity: which credentials it reads, how it caches API-key exchanges."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from narthex.common.authn import MissingToken
from narthex.common.errors import ServiceUnavailable
from narthex.common.http import ClientPolicy, ServiceClient
from narthex.common.security import (
    InvalidToken,
    JwksCache,
    SigningKey,
    TokenVerifier,
    generate_api_key,
    issue_token,
)
from narthex.gateway.identity import Identity, InvalidApiKey, KeyInQuery
from tests.support.scripted import Reply, ScriptedUpstream
from tests.support.upstream import refusing_port

KEY = SigningKey.generate()
API_KEY = str(generate_api_key("dev"))


def token(subject: str = "t_acme", ttl: int = 900) -> str:
    return issue_token(
        KEY,
        issuer="narthex-auth",
        audience="narthex",
        subject=subject,
        plan="standard",
        roles=["tenant"],
        scopes=["inference"],
        ttl=ttl,
    )


def verifier() -> TokenVerifier:
    jwks = JwksCache.static({"keys": [KEY.public_jwk()]})
    return TokenVerifier(jwks, issuer="narthex-auth", audience="narthex")


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
    url: str, *, revalidate_seconds: float = 30.0, refused_seconds: float = 5.0
) -> tuple[Identity, ServiceClient]:
    client = ServiceClient("auth", url, ClientPolicy(try_timeout=1.0, deadline=2.0))
    identity = Identity(
        verifier(), client, revalidate_seconds=revalidate_seconds, refused_seconds=refused_seconds
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
                with pytest.raises(InvalidApiKey):
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
