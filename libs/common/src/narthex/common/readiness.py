"""Readiness: named dependency checks, run together, reported per dependency."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger("narthex.readiness")


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: dict[str, Any] = field(default_factory=dict)


Check = Callable[[], Awaitable[CheckResult]]


async def run_check(name: str, check: Check, within: float) -> CheckResult:
    """`check()` within `within` s; a timeout or an error is a failed check, never raised."""
    try:
        async with asyncio.timeout(within):
            return await check()
    except TimeoutError:
        return CheckResult(False, {"error": "check timed out"})
    except Exception as exc:
        # The detail goes to the log; the probe only needs to know it failed.
        log.warning("readiness check failed", check=name, error=repr(exc))
        return CheckResult(False, {"error": "check failed"})


class Readiness:
    """What `/readyz` asks. Services register checks in their lifespan.

    A check that is not `required` is reported but does not make the service
    not-ready: something worth showing to an operator, but whose absence taking this
    replica out of rotation would not help (every replica shares it).
    """

    def __init__(self, timeout: float = 2.0) -> None:
        self.timeout = timeout
        self._checks: dict[str, tuple[Check, bool]] = {}

    def add(self, name: str, check: Check, *, required: bool = True) -> None:
        self._checks[name] = (check, required)

    def remove(self, name: str) -> None:
        self._checks.pop(name, None)

    async def report(self) -> tuple[bool, dict[str, Any]]:
        names = list(self._checks)
        results = await asyncio.gather(
            *(run_check(n, self._checks[n][0], self.timeout) for n in names)
        )
        checks: dict[str, Any] = {}
        ready = True
        for name, result in zip(names, results, strict=True):
            required = self._checks[name][1]
            entry: dict[str, Any] = {"status": "up" if result.ok else "down"}
            if not required:
                entry["required"] = False
            checks[name] = {**entry, **result.detail}
            ready = ready and (result.ok or not required)
        return ready, {"status": "ready" if ready else "not_ready", "checks": checks}


@dataclass(frozen=True, slots=True)
class Observation:
    """A probe's last result, and when it was taken (`clock()` time)."""

    ok: bool
    detail: dict[str, Any]
    at: float


class Watcher:
    """Probes named dependencies in the background; answers from the last results.

    For state that the public can ask about (a status page, `/readyz` of an edge): a
    request reads what the last round found, so no request, however many arrive, makes
    a call of its own. `poll()` runs one round (every probe at once, each bounded by
    `timeout`); the owner runs it every so often (`narthex.common.background.every`).
    """

    def __init__(
        self,
        probes: Mapping[str, Check],
        *,
        timeout: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probes = dict(probes)
        self._timeout = timeout
        self._clock = clock
        self._last: dict[str, Observation] = {}
        self.rounds = 0

    @property
    def names(self) -> list[str]:
        return list(self._probes)

    async def poll(self) -> None:
        names = list(self._probes)
        results = await asyncio.gather(
            *(run_check(n, self._probes[n], self._timeout) for n in names)
        )
        now = self._clock()
        for name, result in zip(names, results, strict=True):
            self._last[name] = Observation(result.ok, result.detail, now)
        self.rounds += 1

    def last(self, name: str) -> Observation | None:
        return self._last.get(name)

    def age(self, observation: Observation) -> float:
        return max(0.0, self._clock() - observation.at)

    def check(self, name: str, extra: Callable[[], dict[str, Any]] | None = None) -> Check:
        """A readiness check that reports `name`'s last observation (no I/O), and its age."""

        async def cached() -> CheckResult:
            observation = self.last(name)
            detail = extra() if extra is not None else {}
            if observation is None:
                return CheckResult(False, {**detail, "error": "not probed yet"})
            age = round(self.age(observation), 3)
            return CheckResult(
                observation.ok, {**detail, **observation.detail, "checked_seconds_ago": age}
            )

        return cached
