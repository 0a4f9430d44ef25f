"""ServiceCredential: one exchange per burst, renewal ahead of expiry, bounded retries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson
import pytest
from pydantic import SecretStr

from narthex.common.credential import CredentialUnavailable, ServiceCredential
from narthex.common.http import ClientPolicy, ServiceClient
from tests.support.scripted import Reply, ScriptedUpstream

KEY = "nx_test_svc_secret"
LIFETIME = 900


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def issued(token: str, expires_in: int = LIFETIME) -> Reply:
    return Reply(body=orjson.dumps({"access_token": token, "expires_in": expires_in}))


@asynccontextmanager
async def credential(
    auth: ScriptedUpstream, clock: Clock, attempts: int = 3
) -> AsyncIterator[ServiceCredential]:
    policy = ClientPolicy(deadline=2.0, max_attempts=attempts)
    client = ServiceClient("auth", auth.url, policy)
    held = ServiceCredential(client, SecretStr(KEY), clock=clock)
    try:
        yield held
    finally:
        await held.aclose()
        await client.aclose()


async def settle(held: ServiceCredential) -> None:
    """Wait for the exchange running in the background, if any, to end."""
    pending = held._pending
    if pending is not None:
        await asyncio.wait([pending], timeout=10)


async def test_a_burst_of_callers_makes_one_exchange_with_the_key() -> None:
    clock = Clock()
    async with ScriptedUpstream(issued("t1")) as auth, credential(auth, clock) as held:
        tokens = await asyncio.gather(*(held.token() for _ in range(50)))
        assert tokens == ["t1"] * 50
        assert await held.token() == "t1"
    (request,) = auth.requests
    assert (request.method, request.path) == ("POST", "/v1/auth/token")
    assert request.headers["x-api-key"] == KEY


async def test_renewed_in_the_background_after_half_its_lifetime() -> None:
    clock = Clock()
    async with ScriptedUpstream(issued("t1")) as auth, credential(auth, clock) as held:
        assert await held.token() == "t1"
        clock.now += LIFETIME / 2 - 1
        assert await held.token() == "t1"
        assert held.exchanges == 1

        auth.reply = issued("t2")
        clock.now += 2  # past half: the held token answers at once, a renewal starts
        assert await held.token() == "t1"
        await settle(held)
        assert held.exchanges == 2
        assert await held.token() == "t2"


async def test_a_failed_renewal_keeps_the_held_token_until_it_expires() -> None:
    clock = Clock()
    async with ScriptedUpstream(issued("t1")) as auth, credential(auth, clock) as held:
        assert await held.token() == "t1"
        auth.reply = Reply(status=500, body=b"down")
        clock.now += LIFETIME * 0.75
        assert await held.token() == "t1"
        await settle(held)
        assert await held.token() == "t1"  # the renewal failed: still good for a while
        clock.now += LIFETIME * 0.25  # now within the expiry margin
        with pytest.raises(CredentialUnavailable, match="badly"):
            await held.token()


async def test_after_a_failure_auth_is_not_asked_again_until_the_retry_is_due() -> None:
    clock = Clock()
    async with (
        ScriptedUpstream(Reply(status=503, body=b"")) as auth,
        credential(auth, clock, attempts=1) as held,
    ):
        with pytest.raises(CredentialUnavailable):
            await held.token()
        for _ in range(20):
            with pytest.raises(CredentialUnavailable):
                await held.token()
        assert len(auth.requests) == 1
        auth.reply = issued("t1")
        clock.now += held.retry_seconds
        assert await held.token() == "t1"
        assert len(auth.requests) == 2


async def test_a_refused_key_is_retried_only_after_the_longer_wait() -> None:
    clock = Clock()
    async with (
        ScriptedUpstream(Reply(status=401, body=b"{}")) as auth,
        credential(auth, clock) as held,
    ):
        with pytest.raises(CredentialUnavailable, match="refused"):
            await held.token()
        clock.now += held.retry_seconds
        with pytest.raises(CredentialUnavailable, match="refused"):
            await held.token()
        assert len(auth.requests) == 1
        clock.now += held.refused_retry_seconds
        with pytest.raises(CredentialUnavailable):
            await held.token()
        assert len(auth.requests) == 2


async def test_auth_unreachable_is_unavailable_not_an_error() -> None:
    async with ScriptedUpstream() as gone:
        url = gone.url
    clock = Clock()
    client = ServiceClient("auth", url, ClientPolicy(deadline=1.0, max_attempts=1))
    held = ServiceCredential(client, SecretStr(KEY), clock=clock)
    try:
        with pytest.raises(CredentialUnavailable, match="unavailable"):
            await held.token()
    finally:
        await client.aclose()


async def test_an_invalidated_token_is_exchanged_again_a_newer_one_is_kept() -> None:
    clock = Clock()
    async with ScriptedUpstream(issued("t1")) as auth, credential(auth, clock) as held:
        assert await held.token() == "t1"
        held.invalidate("stale")  # not the held one: nothing happens
        assert await held.token() == "t1"
        auth.reply = issued("t2")
        held.invalidate("t1")
        assert await held.token() == "t2"
        assert held.exchanges == 2


async def test_refresh_soon_fetches_ahead_of_the_first_call() -> None:
    clock = Clock()
    async with ScriptedUpstream(issued("t1")) as auth, credential(auth, clock) as held:
        held.refresh_soon()
        await settle(held)
        assert len(auth.requests) == 1
        assert await held.token() == "t1"
        assert len(auth.requests) == 1
