"""The revocation list: polled from auth, kept through an outage, checked per principal."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from narthex.common.http import ClientPolicy, ServiceClient
from narthex.common.tokens import Principal
from narthex.gateway.revocations import REVOCATIONS_PATH, Revocations
from tests.support.scripted import Reply, ScriptedUpstream


def listing(keys: list[str], tenants: list[str]) -> Reply:
    body = {"keys": keys, "tenants": tenants, "window_seconds": 990}
    return Reply(body=json.dumps(body).encode())


def principal(tenant: str, key_id: str | None) -> Principal:
    return Principal(tenant, "standard", frozenset(), frozenset(), "jti", 0.0, "tok", key_id)


class Clock:
    now = 50.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def auth() -> AsyncIterator[ScriptedUpstream]:
    async with ScriptedUpstream(listing(["k1"], ["t_off"])) as server:
        yield server


async def test_a_poll_brings_the_list_and_refusals_follow_it(auth: ScriptedUpstream) -> None:
    clock = Clock()
    async with ServiceClient("auth", auth.url, ClientPolicy(max_attempts=1)) as client:
        revocations = Revocations(client, clock=clock)
        assert not (await revocations.check()).ok  # never polled: reported, not refused
        assert not revocations.refuses(principal("t_off", "k1"))

        await revocations.poll()
        clock.now += 4
        check = await revocations.check()

    assert revocations.refuses(principal("t_on", "k1"))  # its key
    assert revocations.refuses(principal("t_off", "k9"))  # its tenant
    assert revocations.refuses(principal("t_off", None))  # a token naming no key
    assert not revocations.refuses(principal("t_on", "k2"))
    assert not revocations.refuses(principal("t_on", None))
    assert check.ok
    assert check.detail == {"polls": 1, "keys": 1, "tenants": 1, "updated_seconds_ago": 4.0}
    (request,) = auth.requests
    assert (request.method, request.path) == ("GET", REVOCATIONS_PATH)


@pytest.mark.parametrize(
    "reply",
    [
        Reply(status=500, body=b"boom"),
        Reply(status=404, body=b"{}"),
        Reply(body=b'{"keys": "k1", "tenants": []}'),
        Reply(body=b'{"keys": [1], "tenants": []}'),
        Reply(body=b"not json"),
    ],
)
async def test_a_failed_or_malformed_poll_keeps_the_last_list(
    auth: ScriptedUpstream, reply: Reply
) -> None:
    async with ServiceClient("auth", auth.url, ClientPolicy(max_attempts=1)) as client:
        revocations = Revocations(client)
        await revocations.poll()
        auth.reply = reply
        with pytest.raises(Exception):  # noqa: B017, PT011 - whatever it is, it is logged
            await revocations.poll()
    assert revocations.keys == frozenset({"k1"})
    assert revocations.tenants == frozenset({"t_off"})
    assert revocations.polls == 1
