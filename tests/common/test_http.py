"""ServiceClient against a real, misbehaving local upstream (tests.support.upstream).

Timeouts, deadlines, retries, backoff, the retry budget and circuit breaking are all
observed from the upstream's side: what arrived, when, and how often.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import socket
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from narthex.common.app import service_app
from narthex.common.context import request_id_var
from narthex.common.deadline import DEADLINE_HEADER, deadline
from narthex.common.errors import Problem
from narthex.common.http import (
    CircuitOpen,
    ClientPolicy,
    RetryBudget,
    ServiceClient,
    UpstreamBadResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
    is_backpressure,
)
from narthex.common.settings import ServiceSettings
from narthex.common.transport import Exchange
from narthex.testing.clock import ManualClock
from tests.support.scripted import Reply, ScriptedUpstream
from tests.support.upstream import UpstreamServer, refusing_port

# How long the slow upstream takes to answer. A cut try shows as an elapsed time at least
# its limit and well under this: lower bounds only, since a loaded machine only adds time.
UPSTREAM_DELAY = 5.0
# The jittered backoff's draws, measured between arrivals, may run this much late.
SLACK = 0.15

# Small backoff keeps the file fast; timeouts a loaded machine never reaches keep tests
# that are not about timing from timing out (those that are set their own); a breaker
# that never opens unless a test asks for one keeps retry tests independent of breaking.
BASE_POLICY = ClientPolicy(
    connect_timeout=5.0,
    try_timeout=5.0,
    deadline=10.0,
    max_attempts=3,
    backoff_base=0.005,
    backoff_max=0.01,
    breaker_fail_max=1000,
    breaker_reset_timeout=30.0,
)


def policy(**overrides: Any) -> ClientPolicy:
    return dataclasses.replace(BASE_POLICY, **overrides)


@pytest.fixture
async def server() -> AsyncIterator[UpstreamServer]:
    async with UpstreamServer() as upstream:
        yield upstream


async def timed_out(call: Awaitable[object]) -> tuple[float, UpstreamTimeout]:
    """Await `call`, which must fail with UpstreamTimeout: the seconds it took, and the error."""
    start = time.monotonic()
    with pytest.raises(UpstreamTimeout) as caught:
        await call
    return time.monotonic() - start, caught.value


def retry_after(headers: Any) -> int:
    """The Retry-After header as an integer (fails the test when absent or not one)."""
    value = headers["Retry-After"]
    assert isinstance(value, str)
    assert value.isdigit(), value
    return int(value)


def gaps(stamps: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(stamps)]


# -- timeouts and deadlines ---------------------------------------------------------------


# ServiceClient takes any httpx transport; per-try timeouts must hold on each.
TRANSPORTS = [
    pytest.param(lambda: None, id="h1-default"),
    pytest.param(httpx.AsyncHTTPTransport, id="httpx-transport"),
]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_each_try_is_cut_at_try_timeout_and_final_error_is_504(
    server: UpstreamServer, transport: Callable[[], httpx.AsyncBaseTransport | None]
) -> None:
    server.behave(None, delay=UPSTREAM_DELAY)
    async with ServiceClient(
        "svc", server.url, policy(try_timeout=0.5), transport=transport()
    ) as client:
        elapsed, caught_error = await timed_out(client.get("/slow"))

    assert server.calls("/slow") == 3
    # Between two arrivals: one try cut at try_timeout, then a backoff of <= 10 ms
    # (the lower bound allows for the server noting an arrival late).
    for gap in gaps(server.arrivals()):
        assert 0.3 <= gap < UPSTREAM_DELAY
    assert 1.5 <= elapsed < UPSTREAM_DELAY  # three tries cut, none waited for the answer
    assert caught_error.status == 504
    assert retry_after(caught_error.headers) >= 1


async def test_overall_deadline_bounds_a_try_whose_try_timeout_is_longer(
    server: UpstreamServer,
) -> None:
    server.behave(None, delay=UPSTREAM_DELAY)
    async with ServiceClient(
        "svc", server.url, policy(try_timeout=2.0, deadline=0.25, max_attempts=5)
    ) as client:
        elapsed, _ = await timed_out(client.get("/slow"))

    assert 0.24 <= elapsed < UPSTREAM_DELAY
    # The one try used the whole deadline: no second try once it had passed.
    assert server.calls() == 1


async def test_retries_stop_at_the_deadline_and_none_starts_after_it(
    server: UpstreamServer,
) -> None:
    server.behave(None, delay=UPSTREAM_DELAY)
    async with ServiceClient(
        "svc",
        server.url,
        # Backoff long enough that retrying past the deadline would show in the time.
        policy(try_timeout=0.4, deadline=1.5, max_attempts=20, backoff_base=0.25, backoff_max=0.5),
    ) as client:
        elapsed, _ = await timed_out(client.get("/slow"))

    assert server.calls() >= 2  # it did retry ...
    assert server.calls() < 20  # ... but the deadline, not max_attempts, ended it
    # Each try left with time still to spend: none started after the deadline.
    assert all(int(r.headers[DEADLINE_HEADER]) >= 1 for r in server.requests)
    assert elapsed < UPSTREAM_DELAY


async def test_outer_deadline_shorter_than_the_policy_is_respected(
    server: UpstreamServer,
) -> None:
    server.behave(None, delay=UPSTREAM_DELAY)
    async with ServiceClient(
        "svc", server.url, policy(try_timeout=0.4, deadline=5.0, max_attempts=20)
    ) as client:
        with deadline(1.0):
            elapsed, _ = await timed_out(client.get("/slow"))

    assert elapsed < UPSTREAM_DELAY
    assert server.calls() >= 2
    # Each try told the upstream how little time was left, never the policy's 5 s.
    budgets = [int(r.headers[DEADLINE_HEADER]) for r in server.requests]
    assert all(1 <= ms <= 1000 for ms in budgets)
    assert budgets == sorted(budgets, reverse=True)


async def test_per_call_deadline_argument_overrides_the_policy(server: UpstreamServer) -> None:
    server.behave(None, delay=UPSTREAM_DELAY)
    async with ServiceClient("svc", server.url, policy(try_timeout=2.0, deadline=5.0)) as client:
        elapsed, _ = await timed_out(client.get("/slow", deadline=0.15))

    assert 0.14 <= elapsed < UPSTREAM_DELAY
    assert int(server.requests[0].headers[DEADLINE_HEADER]) <= 150


# -- what is retried ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_idempotent_method_is_retried_until_the_upstream_recovers(
    server: UpstreamServer, method: str
) -> None:
    server.behave(None, status=503, times=2)
    async with ServiceClient("svc", server.url, policy()) as client:
        response = await client.request(method, "/thing")

    assert response.status_code == 200
    assert server.calls("/thing") == 3
    assert {r.method for r in server.requests} == {method}


async def test_post_answered_5xx_is_not_retried_and_the_response_is_returned(
    server: UpstreamServer,
) -> None:
    server.behave(None, status=503)
    async with ServiceClient("svc", server.url, policy()) as client:
        response = await client.post("/orders", json={"n": 1})

    assert response.status_code == 503
    assert response.json()["error"] == 503
    assert server.calls("/orders") == 1


async def test_post_on_a_dropped_connection_is_not_retried(server: UpstreamServer) -> None:
    server.behave(None, drop=True)
    async with ServiceClient("svc", server.url, policy()) as client:
        with pytest.raises(UpstreamUnavailable) as caught:
            await client.post("/orders", json={"n": 1})

    assert server.calls("/orders") == 1
    assert server.requests[0].json() == {"n": 1}  # it was sent: retrying could repeat it
    assert caught.value.status == 503
    assert retry_after(caught.value.headers) >= 1


async def test_get_on_a_dropped_connection_is_retried(server: UpstreamServer) -> None:
    server.behave(None, drop=True, times=2)
    async with ServiceClient("svc", server.url, policy()) as client:
        response = await client.get("/thing")

    assert response.status_code == 200
    assert server.calls() == 3


async def test_post_marked_idempotent_is_retried(server: UpstreamServer) -> None:
    server.behave(None, status=503, times=2)
    async with ServiceClient("svc", server.url, policy()) as client:
        response = await client.post("/orders", json={"n": 1}, idempotent=True)

    assert response.status_code == 200
    assert server.calls("/orders") == 3


async def test_post_that_never_connected_is_retried() -> None:
    # Nothing listens, so no try leaves the process and a POST is safe to retry. Every
    # try goes through the breaker and a refused connection counts against it, so the
    # breaker's consecutive-failure counter is an exact count of tries; a POST that did
    # reach an upstream (dropped, below) counts exactly one.
    with refusing_port() as port:
        async with ServiceClient("svc", f"http://127.0.0.1:{port}", policy()) as client:
            with pytest.raises(UpstreamUnavailable):
                await client.post("/orders", json={"n": 1})
            assert client.breaker.fail_counter == 3


async def test_sent_post_counts_one_try_against_the_breaker(server: UpstreamServer) -> None:
    # The counterpart of the test above: the same counter reads 1 for a sent POST.
    server.behave(None, drop=True)
    async with ServiceClient("svc", server.url, policy()) as client:
        with pytest.raises(UpstreamUnavailable):
            await client.post("/orders")
        assert client.breaker.fail_counter == 1


async def test_retries_off_sends_exactly_one_try(server: UpstreamServer) -> None:
    server.behave(None, status=503)
    async with ServiceClient("svc", server.url, policy(retries=False)) as client:
        response = await client.get("/thing")

    assert response.status_code == 503
    assert server.calls() == 1


# -- backoff and retry budget -------------------------------------------------------------


async def test_backoff_is_fully_jittered_and_capped(server: UpstreamServer) -> None:
    # base 0.2 s capped at 0.08 s: full jitter draws each first backoff from [0, 0.08].
    cap = 0.08
    server.behave(None, status=503)
    retry_gaps = []
    async with ServiceClient(
        "svc", server.url, policy(max_attempts=2, backoff_base=0.2, backoff_max=cap)
    ) as client:
        for _ in range(20):
            server.reset()
            server.behave(None, status=503)
            response = await client.get("/thing")
            assert response.status_code == 503
            assert server.calls() == 2
            retry_gaps.extend(gaps(server.arrivals()))

    assert len(retry_gaps) == 20
    assert all(0 <= gap <= cap + SLACK for gap in retry_gaps)
    assert statistics.mean(retry_gaps) < cap  # capped: uncapped, the mean would be ~0.1
    assert max(retry_gaps) - min(retry_gaps) > 0.03  # jittered, not a fixed delay
    assert min(retry_gaps) < cap / 2  # full jitter: can be far below the nominal delay


async def test_retry_budget_bounds_upstream_load_under_sustained_failure(
    server: UpstreamServer,
) -> None:
    server.behave(None, status=503)
    budgeted = policy(max_attempts=3, retry_budget_ratio=0.2, retry_budget_min_per_second=0.0)
    async with ServiceClient("svc", server.url, budgeted) as client:
        for _ in range(50):
            response = await client.get("/thing")
            assert response.status_code == 503

    # Without a budget: 150 calls. With it: 50 firsts plus at most 20% (+1) retries.
    assert 50 < server.calls() <= 50 + 10 + 1


def test_retry_budget_allows_a_ratio_of_recent_requests() -> None:
    budget = RetryBudget(ratio=0.5, min_per_second=0.0)
    for _ in range(10):
        budget.record_request()
    spent = [budget.try_spend() for _ in range(8)]
    assert spent == [True] * 5 + [False] * 3


def test_retry_budget_floor_allows_retries_with_no_traffic() -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=1.0, window=3)
    assert [budget.try_spend() for _ in range(4)] == [True, True, True, False]


def test_retry_budget_forgets_traffic_older_than_its_window() -> None:
    clock = ManualClock(1000.0)
    budget = RetryBudget(ratio=1.0, min_per_second=0.0, window=10, clock=clock)
    budget.record_request()
    assert budget.try_spend()
    assert not budget.try_spend()
    clock.now += 5
    assert not budget.try_spend()  # still inside the window: still spent
    clock.now += 6
    budget.record_request()
    assert budget.try_spend()  # the old retry left the window
    assert not budget.try_spend()


# -- circuit breaking -----------------------------------------------------------------------


async def test_breaker_opens_after_consecutive_failures_and_then_fails_fast(
    server: UpstreamServer,
) -> None:
    server.behave(None, status=503)
    tight = policy(max_attempts=1, breaker_fail_max=3, breaker_reset_timeout=30.0)
    async with ServiceClient("svc", server.url, tight) as client:
        for _ in range(3):
            assert (await client.get("/thing")).status_code == 503
        assert client.breaker.state == "open"
        with pytest.raises(CircuitOpen) as caught:
            await client.get("/thing")

    assert server.calls() == 3  # the refused call never reached the upstream
    assert caught.value.status == 503
    assert 29 <= retry_after(caught.value.headers) <= 30


async def test_timeouts_and_dropped_connections_count_against_the_breaker(
    server: UpstreamServer,
) -> None:
    server.behave("/slow", delay=UPSTREAM_DELAY)
    server.behave("/drop", drop=True)
    tight = policy(try_timeout=0.5, max_attempts=1, breaker_fail_max=2)
    async with ServiceClient("svc", server.url, tight) as client:
        with pytest.raises(UpstreamTimeout):
            await client.get("/slow")
        with pytest.raises(UpstreamUnavailable):
            await client.get("/drop")
        assert client.breaker.state == "open"
        with pytest.raises(CircuitOpen):
            await client.get("/fine")

    assert server.calls("/fine") == 0


async def test_4xx_answers_never_count_against_the_breaker(server: UpstreamServer) -> None:
    tight = policy(max_attempts=1, breaker_fail_max=3)
    async with ServiceClient("svc", server.url, tight) as client:
        server.behave(None, status=503)
        for _ in range(2):
            await client.get("/thing")
        assert client.breaker.fail_counter == 2
        for status in (404, 429) * 10:
            server.behave(None, status=status)
            assert (await client.get("/thing")).status_code == status
        assert client.breaker.state == "closed"
        assert client.breaker.fail_counter == 0

    assert server.calls() == 22


async def test_a_4xx_between_failures_resets_the_consecutive_count(
    server: UpstreamServer,
) -> None:
    tight = policy(max_attempts=1, breaker_fail_max=3)
    async with ServiceClient("svc", server.url, tight) as client:
        for status in (503, 503, 404, 503, 503):
            server.behave(None, status=status)
            await client.get("/thing")
        assert client.breaker.state == "closed"  # 2 + 2 failures, never 3 in a row
        server.behave(None, status=500)
        await client.get("/thing")
        assert client.breaker.state == "open"  # the third consecutive one trips it


# -- what a caller causes, and backpressure, never count ---------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("via", ["send", "forward"])
async def test_a_try_cut_by_the_callers_deadline_never_counts_against_the_breaker(
    server: UpstreamServer,
    transport: Callable[[], httpx.AsyncBaseTransport | None],
    via: str,
) -> None:
    """The caller chose its budget: a try that budget cut short says nothing about the
    upstream. Fifty of them leave the breaker (fail_max 1) closed and its count at 0."""
    server.behave(None, delay=UPSTREAM_DELAY)
    tight = policy(try_timeout=2.0, breaker_fail_max=1)
    async with ServiceClient("svc", server.url, tight, transport=transport()) as client:

        async def call() -> object:
            if via == "send":
                return await client.get("/slow")
            return await client.forward("GET", "/slow", [], b"")

        for _ in range(50 if via == "forward" else 5):
            with deadline(0.01), pytest.raises(UpstreamTimeout):
                await call()
        assert client.breaker.state == "closed"
        assert client.breaker.fail_counter == 0
        # Not retried either: the caller's budget is gone (on a busy machine a 10 ms
        # budget can run out before a request even arrives).
        assert server.calls() <= (50 if via == "forward" else 5)
        # A try that its own try_timeout cuts (no caller deadline) still counts.
        client.policy = dataclasses.replace(tight, try_timeout=0.5, max_attempts=1)
        with pytest.raises(UpstreamTimeout):
            await call()
        assert client.breaker.state == "open"


@contextlib.contextmanager
def connects_that_hang() -> Iterator[str]:
    """A loopback port whose accept queue is full: a new connection's SYN goes unanswered,
    so connecting hangs until whoever connects gives up."""
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(socket.socket())
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        address = server.getsockname()
        for _ in range(4):  # never accepted: they fill the queue
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            filler.connect_ex(address)
        yield f"http://127.0.0.1:{address[1]}"


async def test_connecting_cut_by_the_callers_deadline_is_neutral_by_its_own_limit_counts() -> None:
    """Connecting has its own, shorter limit: a caller's deadline that is longer than
    it does not make a connect timeout the caller's doing."""
    tight = policy(connect_timeout=0.2, try_timeout=2.0, breaker_fail_max=1, max_attempts=1)
    with connects_that_hang() as url:
        async with ServiceClient("svc", url, tight) as client:
            for _ in range(3):
                with deadline(0.05), pytest.raises(UpstreamTimeout):
                    await client.get("/x")
            assert client.breaker.state == "closed"
            with deadline(5.0), pytest.raises(UpstreamUnavailable):
                await client.get("/x")  # the connect limit, not the caller, ended it
            assert client.breaker.state == "open"


async def test_an_upstream_504_for_the_callers_own_deadline_is_neutral(
    scripted: ScriptedUpstream,
) -> None:
    """Inference drops work whose deadline passed with a 504: when the deadline was the
    caller's, so is the failure."""
    scripted.reply = Reply(504, body=b'{"type": "deadline-exceeded"}')
    tight = policy(try_timeout=2.0, breaker_fail_max=1, max_attempts=1)
    async with ServiceClient("svc", scripted.url, tight) as client:
        for _ in range(5):
            with deadline(1.0):
                assert (await client.get("/x")).status_code == 504
        assert client.breaker.state == "closed"
        assert (await client.get("/x")).status_code == 504  # the upstream's own verdict
        assert client.breaker.state == "open"


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (503, [("Retry-After", "2")]),
        (503, [("retry-after", "Wed, 21 Oct 2065 07:28:00 GMT")]),
        (429, []),
        (429, [("Retry-After", "1")]),
    ],
)
async def test_backpressure_is_returned_at_once_and_never_counts(
    scripted: ScriptedUpstream, status: int, headers: list[tuple[str, str]]
) -> None:
    scripted.reply = Reply(status, [("Content-Type", "application/json"), *headers])
    async with ServiceClient("svc", scripted.url, policy(breaker_fail_max=1)) as client:
        for _ in range(5):
            response = await client.get("/busy")  # a GET: retried were it a failure
            assert response.status_code == status
            exchange = await client.forward("GET", "/busy", [], b"")
            assert exchange.status_code == status
        assert client.breaker.state == "closed"
    assert len(scripted.requests) == 10


@pytest.mark.parametrize(
    ("status", "retry_after_value", "expected"),
    [
        (503, b"5", True),
        (503, b"Sun, 06 Nov 1994 08:49:37 GMT", True),
        (503, None, False),
        (503, b"", False),
        (503, b"soon", False),
        (503, b"-1", False),
        (503, b"99999999999", False),
        (429, None, True),
        (500, b"5", False),
        (502, b"5", False),
        (504, b"5", False),
    ],
)
def test_what_counts_as_backpressure(
    status: int, retry_after_value: bytes | None, expected: bool
) -> None:
    headers = [] if retry_after_value is None else [(b"Retry-After", retry_after_value)]
    assert is_backpressure(Exchange(status, headers, b"")) is expected
    as_httpx = httpx.Response(status, headers=headers)
    assert is_backpressure(as_httpx) is expected


async def test_an_oversized_answer_is_a_502_counted_and_not_retried(
    scripted: ScriptedUpstream,
) -> None:
    scripted.reply = Reply(200, body=b"x" * 5000)
    tight = policy(max_response_bytes=4096, breaker_fail_max=2)
    async with ServiceClient("svc", scripted.url, tight) as client:
        with pytest.raises(UpstreamBadResponse) as caught:
            await client.get("/big")
        with pytest.raises(UpstreamBadResponse):
            await client.forward("GET", "/big", [], b"")
        assert client.breaker.state == "open"
    assert caught.value.status == 502
    assert len(scripted.requests) == 2


async def test_a_probe_goes_around_the_breaker_both_ways(server: UpstreamServer) -> None:
    tight = policy(max_attempts=1, breaker_fail_max=2)
    async with ServiceClient("svc", server.url, tight) as client:
        server.behave(None, status=500)
        for _ in range(5):
            assert (await client.probe("/readyz", 1.0)).status_code == 500
        assert client.breaker.fail_counter == 0  # probes never feed it
        await _open_breaker(client, server)
        server.behave(None)
        assert (await client.probe("/readyz", 1.0)).status_code == 200  # nor are refused


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedUpstream]:
    async with ScriptedUpstream() as upstream:
        yield upstream


async def _open_breaker(client: ServiceClient, server: UpstreamServer) -> None:
    server.behave(None, status=503)
    for _ in range(client.policy.breaker_fail_max):
        await client.get("/thing", idempotent=False)
    assert client.breaker.state == "open"


async def test_half_open_admits_exactly_one_trial_among_20_concurrent_callers(
    server: UpstreamServer,
) -> None:
    half_open = policy(breaker_fail_max=3, breaker_reset_timeout=0.2)
    clock = ManualClock(1000.0)
    async with ServiceClient("svc", server.url, half_open, breaker_clock=clock) as client:
        await _open_breaker(client, server)
        clock.advance(0.25)
        assert client.breaker.state == "half-open"
        server.reset()
        server.behave(None, delay=0.3)  # healthy again, and slow enough to overlap

        outcomes = await asyncio.gather(
            *(client.get("/thing") for _ in range(20)), return_exceptions=True
        )

        refused = [o for o in outcomes if isinstance(o, CircuitOpen)]
        passed = [o for o in outcomes if isinstance(o, httpx.Response)]
        assert server.calls() == 1
        assert len(refused) == 19
        assert len(passed) == 1
        assert passed[0].status_code == 200
        assert client.breaker.state == "closed"

        server.behave(None)  # no delay
        assert (await client.get("/after")).status_code == 200
        assert server.calls("/after") == 1


async def test_failing_trial_reopens_the_breaker(server: UpstreamServer) -> None:
    half_open = policy(breaker_fail_max=3, breaker_reset_timeout=0.2)
    clock = ManualClock(1000.0)
    async with ServiceClient("svc", server.url, half_open, breaker_clock=clock) as client:
        await _open_breaker(client, server)
        clock.advance(0.25)
        server.reset()
        server.behave(None, status=503, delay=0.1)

        outcomes = await asyncio.gather(
            *(client.get("/thing") for _ in range(20)), return_exceptions=True
        )

        assert server.calls() == 1
        assert all(isinstance(o, CircuitOpen) for o in outcomes)
        assert client.breaker.state == "open"
        assert client.breaker.retry_after() == pytest.approx(0.2)  # a fresh reset period began
        with pytest.raises(CircuitOpen):
            await client.get("/thing")
        assert server.calls() == 1


async def test_cancelled_trial_leaves_the_breaker_half_open_for_the_next_caller(
    server: UpstreamServer,
) -> None:
    """A trial whose caller hung up proved nothing either way: it neither closes the
    breaker nor re-opens it (which would let a client that keeps winning the trial and
    hanging up hold an upstream switched off); the next caller is the trial."""
    half_open = policy(breaker_fail_max=3, breaker_reset_timeout=0.2)
    clock = ManualClock(1000.0)
    async with ServiceClient("svc", server.url, half_open, breaker_clock=clock) as client:
        await _open_breaker(client, server)
        clock.advance(0.25)
        server.reset()
        server.behave(None, delay=UPSTREAM_DELAY)

        trial = asyncio.create_task(client.get("/thing"))
        await server.wait_for_calls(1)
        trial.cancel()
        with pytest.raises(asyncio.CancelledError):
            await trial

        assert client.breaker.state == "half-open"
        server.behave(None)
        assert (await client.get("/thing")).status_code == 200
        assert server.calls() == 2
        assert client.breaker.state == "closed"


# -- the proxy's path: forward() ------------------------------------------------------------


async def test_forward_cuts_each_try_at_try_timeout(server: UpstreamServer) -> None:
    server.behave(None, delay=UPSTREAM_DELAY)
    async with ServiceClient("svc", server.url, policy(try_timeout=0.5)) as client:
        elapsed, _ = await timed_out(client.forward("GET", "/slow?q=1", [], b""))

    assert server.calls("/slow") == 3
    assert 1.5 <= elapsed < UPSTREAM_DELAY


async def test_forward_respects_an_outer_deadline_shorter_than_try_timeout(
    server: UpstreamServer,
) -> None:
    server.behave(None, delay=UPSTREAM_DELAY)
    async with ServiceClient("svc", server.url, policy(try_timeout=2.0, deadline=5.0)) as client:
        with deadline(0.2):
            elapsed, _ = await timed_out(client.forward("GET", "/slow", [], b""))

    assert 0.19 <= elapsed < UPSTREAM_DELAY
    assert server.calls() == 1
    assert int(server.requests[0].headers[DEADLINE_HEADER]) <= 200


async def test_forward_retries_get_but_not_a_sent_post(server: UpstreamServer) -> None:
    async with ServiceClient("svc", server.url, policy()) as client:
        server.behave("/get", status=503, times=2)
        got = await client.forward("GET", "/get", [], b"")
        server.behave("/post", status=503)
        posted = await client.forward("POST", "/post", [], b'{"n": 1}')
        server.behave("/drop", drop=True)
        with pytest.raises(UpstreamUnavailable):
            await client.forward("POST", "/drop", [], b"{}")

    assert (got.status_code, server.calls("/get")) == (200, 3)
    assert (posted.status_code, server.calls("/post")) == (503, 1)
    assert server.calls("/drop") == 1


async def test_forward_relays_headers_body_request_id_and_deadline(
    server: UpstreamServer,
) -> None:
    token = request_id_var.set("req-forward-0001")
    try:
        async with ServiceClient(
            "svc", server.url, policy(deadline=2.0, try_timeout=1.5)
        ) as client:
            exchange = await client.forward(
                "PUT", "/items/7?v=2", [(b"content-type", b"application/json")], b'{"a": 1}'
            )
    finally:
        request_id_var.reset(token)

    assert exchange.status_code == 200
    assert json.loads(exchange.content)["path"] == "/items/7"
    (seen,) = server.requests
    assert (seen.method, seen.path, seen.query, seen.body) == (
        "PUT",
        "/items/7",
        "v=2",
        b'{"a": 1}',
    )
    assert seen.header_values("content-type") == ["application/json"]
    assert seen.header_values("x-request-id") == ["req-forward-0001"]
    # The callee's budget is what this try waits: the try timeout, inside the deadline.
    assert 1000 < int(seen.headers[DEADLINE_HEADER]) <= 1500


# -- typed errors as a service renders them -----------------------------------------------


def relay_app(client: ServiceClient) -> FastAPI:
    """A service whose one route calls the upstream through `client`."""
    app = service_app(
        ServiceSettings(tracing=False), title="relay", description="calls one upstream"
    )

    @app.get("/relay")
    async def relay() -> JSONResponse:
        response = await client.get("/thing")
        return JSONResponse(response.json(), status_code=response.status_code)

    return app


async def call_app(app: FastAPI, headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://relay.test") as http:
        return await http.get("/relay", headers=headers)


def assert_problem(response: httpx.Response, status: int, slug: str, port: int) -> None:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    assert retry_after(response.headers) >= 1
    body = response.json()
    assert {"type", "title", "status", "request_id", "trace_id"} <= body.keys()
    assert body["status"] == status
    assert body["type"].endswith("/" + slug)
    assert body["request_id"] == response.headers["x-request-id"]
    # Nothing about the upstream's address or the exception leaks to the caller.
    text = response.text
    for leak in ("127.0.0.1", str(port), "Error", "Errno", "socket", "Connect call"):
        assert leak not in text, leak


async def test_app_renders_upstream_timeout_as_504_problem(server: UpstreamServer) -> None:
    server.behave(None, delay=UPSTREAM_DELAY)
    async with ServiceClient("svc", server.url, policy(try_timeout=0.5)) as client:
        response = await call_app(relay_app(client))

    assert_problem(response, 504, "upstream-timeout", server.port)
    assert server.calls() == 3


async def test_app_renders_refused_connection_as_503_problem() -> None:
    with refusing_port() as port:
        async with ServiceClient("svc", f"http://127.0.0.1:{port}", policy()) as client:
            response = await call_app(relay_app(client))

    assert_problem(response, 503, "upstream-unavailable", port)


async def test_app_renders_open_breaker_as_503_with_remaining_reset_time(
    server: UpstreamServer,
) -> None:
    server.behave(None, status=503)
    tight = policy(max_attempts=1, breaker_fail_max=1, breaker_reset_timeout=30.0)
    async with ServiceClient("svc", server.url, tight) as client:
        app = relay_app(client)
        first = await call_app(app)
        assert first.status_code == 503  # the upstream's own answer, relayed
        assert client.breaker.state == "open"
        await asyncio.sleep(1.1)  # a second of the 30 s passes
        response = await call_app(app)

    assert_problem(response, 503, "circuit-open", server.port)
    assert 28 <= retry_after(response.headers) <= 29
    assert server.calls() == 1


async def test_app_forwards_the_request_id_and_remaining_deadline(
    server: UpstreamServer,
) -> None:
    async with ServiceClient("svc", server.url, policy(deadline=3.0, try_timeout=5.0)) as client:
        app = relay_app(client)
        given = await call_app(app, {"x-request-id": "req-0123456789abcdef"})
        generated = await call_app(app)
        budgeted = await call_app(app, {DEADLINE_HEADER: "400"})

    assert [r.status_code for r in (given, generated, budgeted)] == [200, 200, 200]
    seen = [r.headers for r in server.requests]
    assert given.headers["x-request-id"] == "req-0123456789abcdef"
    assert seen[0]["x-request-id"] == "req-0123456789abcdef"
    assert seen[1]["x-request-id"] == generated.headers["x-request-id"]
    assert seen[1]["x-request-id"] != seen[0]["x-request-id"]
    assert 2000 < int(seen[0][DEADLINE_HEADER]) <= 3000
    assert 0 < int(seen[2][DEADLINE_HEADER]) <= 400  # the caller's budget, not ours


def test_upstream_errors_carry_their_status_and_a_rounded_up_retry_after() -> None:
    # The handlers render any Problem; these are the statuses they render with.
    assert issubclass(UpstreamTimeout, Problem)
    assert (UpstreamTimeout("svc").status, UpstreamUnavailable("svc").status) == (504, 503)
    assert CircuitOpen("svc", retry_after=2.2).headers["Retry-After"] == "3"
    assert CircuitOpen("svc", retry_after=0.0).headers["Retry-After"] == "1"
