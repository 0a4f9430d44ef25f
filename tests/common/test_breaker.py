"""AsyncCircuitBreaker on its own: counting, opening, the single half-open trial; its reset
period runs on a clock the test moves."""

from __future__ import annotations

import asyncio

import pytest

from narthex.common.breaker import AsyncCircuitBreaker, BreakerOpen
from narthex.testing.clock import ManualClock


class Boom(Exception):
    pass


class Neutral(Exception):
    """An error that says nothing about the upstream (is_failure says no)."""


class Upstream:
    """A callable upstream that counts calls and fails, succeeds or waits as told."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail: type[Exception] | None = None
        self.gate: asyncio.Event | None = None

    async def __call__(self) -> str:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail("upstream said no")
        return "ok"


def make_breaker(
    fail_max: int = 3, reset_timeout: float = 30.0, clock: ManualClock | None = None
) -> AsyncCircuitBreaker:
    """A breaker on a clock the test moves (a fresh one, standing still, unless given)."""
    return AsyncCircuitBreaker(
        "svc",
        fail_max=fail_max,
        reset_timeout=reset_timeout,
        is_failure=lambda exc: not isinstance(exc, Neutral),
        clock=clock or ManualClock(1000.0),
    )


async def half_open(reset_timeout: float) -> tuple[AsyncCircuitBreaker, Upstream]:
    """A breaker opened by one failure, its reset period then past on its clock."""
    clock = ManualClock(1000.0)
    breaker, upstream = (
        make_breaker(fail_max=1, reset_timeout=reset_timeout, clock=clock),
        Upstream(),
    )
    await open_it(breaker, upstream, 1)
    clock.advance(reset_timeout * 1.2)
    return breaker, upstream


async def open_it(breaker: AsyncCircuitBreaker, upstream: Upstream, fail_max: int) -> None:
    upstream.fail = Boom
    for _ in range(fail_max):
        with pytest.raises(Boom):
            await breaker.call(upstream)
    assert breaker.state == "open"
    upstream.fail = None


async def test_opens_after_fail_max_consecutive_failures_and_refuses_without_calling() -> None:
    breaker, upstream = make_breaker(fail_max=3), Upstream()
    upstream.fail = Boom
    for expected in (1, 2):
        with pytest.raises(Boom):  # the upstream's own error, not a breaker error
            await breaker.call(upstream)
        assert breaker.fail_counter == expected
        assert breaker.state == "closed"
    with pytest.raises(Boom):
        await breaker.call(upstream)
    assert breaker.state == "open"

    with pytest.raises(BreakerOpen) as caught:
        await breaker.call(upstream)
    assert upstream.calls == 3
    assert 29.0 < caught.value.retry_after <= 30.0
    assert caught.value.name == "svc"


async def test_a_success_resets_the_consecutive_failure_count() -> None:
    breaker, upstream = make_breaker(fail_max=3), Upstream()
    for fail in (True, True, False, True, True):
        upstream.fail = Boom if fail else None
        if fail:
            with pytest.raises(Boom):
                await breaker.call(upstream)
        else:
            assert await breaker.call(upstream) == "ok"
    assert breaker.state == "closed"
    assert breaker.fail_counter == 2


async def test_errors_that_are_not_failures_never_open_it() -> None:
    breaker, upstream = make_breaker(fail_max=2), Upstream()
    upstream.fail = Neutral
    for _ in range(10):
        with pytest.raises(Neutral):  # propagated to the caller all the same
            await breaker.call(upstream)
    assert breaker.state == "closed"
    assert breaker.fail_counter == 0
    assert upstream.calls == 10


async def test_retry_after_is_zero_unless_open() -> None:
    clock = ManualClock(1000.0)
    breaker, upstream = make_breaker(fail_max=1, reset_timeout=0.05, clock=clock), Upstream()
    assert breaker.retry_after() == 0.0
    await open_it(breaker, upstream, 1)
    assert breaker.retry_after() == pytest.approx(0.05)
    clock.advance(0.04)
    assert breaker.retry_after() == pytest.approx(0.01)
    assert breaker.state == "open"
    with pytest.raises(BreakerOpen):
        await breaker.call(upstream)
    assert upstream.calls == 1
    clock.advance(0.02)
    assert breaker.retry_after() == 0.0
    assert breaker.state == "half-open"  # reported as such before any trial


async def test_half_open_admits_one_trial_at_a_time() -> None:
    breaker, upstream = await half_open(0.05)
    upstream.gate = asyncio.Event()

    trial = asyncio.create_task(breaker.call(upstream))
    await asyncio.sleep(0)  # the trial enters and waits on the gate
    assert upstream.calls == 2
    assert breaker.state == "half-open"
    for _ in range(10):
        with pytest.raises(BreakerOpen) as caught:
            await breaker.call(upstream)
        assert caught.value.retry_after >= 0.1  # never "retry after 0 s"
    assert upstream.calls == 2  # none of the 10 reached the upstream

    upstream.gate.set()
    assert await trial == "ok"
    assert breaker.state == "closed"
    upstream.gate = None
    assert await breaker.call(upstream) == "ok"
    assert upstream.calls == 3


async def test_a_failing_trial_reopens_it_for_a_fresh_reset_period() -> None:
    breaker, upstream = await half_open(0.1)
    upstream.fail = Boom
    with pytest.raises(Boom):
        await breaker.call(upstream)
    assert breaker.state == "open"
    assert breaker.retry_after() == pytest.approx(0.1)  # a fresh period, from the failed trial
    with pytest.raises(BreakerOpen):
        await breaker.call(upstream)
    assert upstream.calls == 2


async def test_a_cancelled_trial_leaves_it_half_open_for_the_next_caller() -> None:
    breaker, upstream = await half_open(0.05)
    upstream.gate = asyncio.Event()  # never set: the trial hangs until cancelled

    trial = asyncio.create_task(breaker.call(upstream))
    await asyncio.sleep(0)
    assert upstream.calls == 2
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial

    # Neither closed (the trial proved nothing) nor re-opened for a fresh period (a
    # caller that keeps hanging up would hold the upstream switched off).
    assert breaker.state == "half-open"
    upstream.gate = None
    assert await breaker.call(upstream) == "ok"  # the next caller is the trial
    assert upstream.calls == 3
    assert breaker.state == "closed"


async def test_a_neutral_trial_leaves_it_half_open_and_a_failing_one_reopens_it() -> None:
    breaker, upstream = await half_open(0.05)
    upstream.fail = Neutral
    for _ in range(3):
        with pytest.raises(Neutral):
            await breaker.call(upstream)
        assert breaker.state == "half-open"
    upstream.fail = Boom
    with pytest.raises(Boom):
        await breaker.call(upstream)
    assert breaker.state == "open"
    assert upstream.calls == 5


async def test_a_neutral_outcome_neither_counts_nor_resets_the_count() -> None:
    """Neutral outcomes are what a caller can cause at will (its deadline, hanging up):
    they must not move the count either way, or a client could hold an upstream's
    breaker shut by interleaving them with its failures."""
    breaker, upstream = make_breaker(fail_max=3), Upstream()
    upstream.fail = Boom
    for _ in range(2):
        with pytest.raises(Boom):
            await breaker.call(upstream)
    upstream.fail = Neutral
    for _ in range(5):
        with pytest.raises(Neutral):
            await breaker.call(upstream)
    assert breaker.fail_counter == 2
    gate = upstream.gate = asyncio.Event()
    cancelled = asyncio.create_task(breaker.call(upstream))
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    gate.set()
    upstream.gate = None
    assert breaker.fail_counter == 2
    upstream.fail = Boom
    with pytest.raises(Boom):
        await breaker.call(upstream)
    assert breaker.state == "open"


async def test_a_neutral_outcome_keeps_failures_counted_meanwhile_by_others() -> None:
    """The count is put back as it stood when the neutral call ended, not as it was
    when the call began: failures of concurrent calls are not forgotten."""
    breaker, upstream = make_breaker(fail_max=3), Upstream()
    slow = Upstream()
    slow.gate = asyncio.Event()
    slow.fail = Neutral
    pending = asyncio.create_task(breaker.call(slow))
    await asyncio.sleep(0)
    upstream.fail = Boom
    for _ in range(2):
        with pytest.raises(Boom):
            await breaker.call(upstream)
    slow.gate.set()
    with pytest.raises(Neutral):
        await pending
    assert breaker.fail_counter == 2
    assert breaker.state == "closed"


async def test_a_cancelled_call_while_closed_is_not_a_failure() -> None:
    breaker, upstream = make_breaker(fail_max=2), Upstream()
    upstream.fail = Boom
    with pytest.raises(Boom):
        await breaker.call(upstream)
    upstream.gate = asyncio.Event()
    call = asyncio.create_task(breaker.call(upstream))
    await asyncio.sleep(0)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert breaker.state == "closed"  # counted as a failure, it would have tripped it
    assert breaker.fail_counter == 1  # nor did it reset the count
