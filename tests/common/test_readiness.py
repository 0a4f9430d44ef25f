"""Readiness: required and reported-only checks, and answers from background probes."""

from __future__ import annotations

import asyncio

from narthex.common.background import every
from narthex.common.readiness import Check, CheckResult, Readiness, Watcher


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fixed(ok: bool, **detail: object) -> Check:
    async def check() -> CheckResult:
        return CheckResult(ok, dict(detail))

    return check


async def test_a_check_that_is_not_required_is_reported_but_never_makes_it_not_ready() -> None:
    readiness = Readiness()
    readiness.add("own", fixed(True))
    readiness.add("shared", fixed(False, why="down"), required=False)
    ready, report = await readiness.report()
    assert ready
    assert report == {
        "status": "ready",
        "checks": {
            "own": {"status": "up"},
            "shared": {"status": "down", "required": False, "why": "down"},
        },
    }
    readiness.add("own", fixed(False))
    ready, report = await readiness.report()
    assert not ready
    assert report["status"] == "not_ready"


async def test_a_watcher_answers_from_its_last_round_with_the_age_of_it() -> None:
    calls = 0
    up = True

    async def probe() -> CheckResult:
        nonlocal calls
        calls += 1
        return CheckResult(up, {"round": calls})

    clock = Clock()
    watcher = Watcher({"svc": probe}, timeout=1.0, clock=clock)
    check = watcher.check("svc", lambda: {"breaker": "closed"})
    assert await check() == CheckResult(False, {"breaker": "closed", "error": "not probed yet"})

    await watcher.poll()
    clock.now += 2.5
    results = [await check() for _ in range(50)]
    assert calls == 1  # fifty reads, one probe
    assert results[-1] == CheckResult(
        True, {"breaker": "closed", "round": 1, "checked_seconds_ago": 2.5}
    )
    up = False
    await watcher.poll()
    assert (await check()).ok is False
    assert watcher.rounds == 2


async def test_a_probe_that_hangs_or_raises_is_down_and_never_holds_the_round() -> None:
    async def hangs() -> CheckResult:
        await asyncio.sleep(60)
        raise AssertionError("unreachable")

    async def raises() -> CheckResult:
        raise RuntimeError("secret detail at 10.0.0.7")

    watcher = Watcher({"hangs": hangs, "raises": raises}, timeout=0.05)
    async with asyncio.timeout(5):
        await watcher.poll()
    hung, raised = watcher.last("hangs"), watcher.last("raises")
    assert hung is not None
    assert (hung.ok, hung.detail) == (False, {"error": "check timed out"})
    assert raised is not None
    assert (raised.ok, raised.detail) == (False, {"error": "check failed"})


async def test_every_runs_once_before_entering_then_on_its_interval_until_exit() -> None:
    runs: list[int] = []
    gate = asyncio.Event()

    async def tick() -> None:
        runs.append(len(runs))
        if len(runs) == 2:
            raise RuntimeError("a failing run does not stop the loop")
        if len(runs) >= 4:
            gate.set()

    async with every(0.01, tick, name="test"):
        assert runs == [0]  # the first run is done when the block starts
        async with asyncio.timeout(5):
            await gate.wait()
    settled = len(runs)
    await asyncio.sleep(0.05)
    assert len(runs) == settled  # stopped with its owner


async def test_every_survives_a_failing_first_run() -> None:
    async def fails() -> None:
        raise RuntimeError("auth is not up yet")

    async with every(0.01, fails, name="test"):
        pass  # entered: a dependency not up at start-up does not stop the service
