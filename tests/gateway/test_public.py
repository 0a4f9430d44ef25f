"""Cached public answers: one upstream call per period, stale rather than nothing."""

from __future__ import annotations

import asyncio

import pytest

from narthex.common.errors import ServiceUnavailable
from narthex.common.transport import Exchange
from narthex.gateway.public import PublicAnswers


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Upstream:
    def __init__(self) -> None:
        self.calls = 0
        self.answer: Exchange | Exception = Exchange(200, [], b"v1")
        self.gate: asyncio.Event | None = None

    async def __call__(self) -> Exchange:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


async def test_one_fetch_per_period_however_many_ask_at_once() -> None:
    clock, upstream = Clock(), Upstream()
    answers = PublicAnswers(5.0, clock=clock)
    upstream.gate = asyncio.Event()
    waiting = [asyncio.create_task(answers.get("jwks", upstream)) for _ in range(50)]
    await asyncio.sleep(0)
    upstream.gate.set()
    got = await asyncio.gather(*waiting)
    assert {a.content for a in got} == {b"v1"}
    clock.now = 4.9
    assert (await answers.get("jwks", upstream)).content == b"v1"
    assert upstream.calls == 1
    clock.now = 5.0
    upstream.answer = Exchange(200, [], b"v2")
    assert (await answers.get("jwks", upstream)).content == b"v2"
    assert upstream.calls == 2


@pytest.mark.parametrize(
    "failure",
    [ServiceUnavailable(), Exchange(502, [], b"boom"), Exchange(503, [], b"")],
    ids=["unreachable", "502", "503"],
)
async def test_a_failing_upstream_gets_the_last_good_answer_served(
    failure: Exchange | Exception,
) -> None:
    clock, upstream = Clock(), Upstream()
    answers = PublicAnswers(5.0, clock=clock)
    await answers.get("jwks", upstream)
    clock.now = 60.0
    upstream.answer = failure
    assert (await answers.get("jwks", upstream)).content == b"v1"
    assert upstream.calls == 2  # it did try


async def test_without_a_good_answer_the_failure_is_the_answer() -> None:
    upstream = Upstream()
    answers = PublicAnswers(5.0, clock=Clock())
    upstream.answer = ServiceUnavailable()
    with pytest.raises(ServiceUnavailable):
        await answers.get("jwks", upstream)
    upstream.answer = Exchange(404, [], b"nope")
    assert (await answers.get("jwks", upstream)).status_code == 404
    upstream.answer = Exchange(200, [], b"v1")
    assert (await answers.get("jwks", upstream)).content == b"v1"  # a 404 is never kept
    assert upstream.calls == 3
