"""Readiness: named dependency checks, run together, reported per dependency."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger("narthex.readiness")


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: dict[str, Any] = field(default_factory=dict)


Check = Callable[[], Awaitable[CheckResult]]


class Readiness:
    """What `/readyz` asks. Services register checks in their lifespan."""

    def __init__(self, timeout: float = 2.0) -> None:
        self.timeout = timeout
        self._checks: dict[str, Check] = {}

    def add(self, name: str, check: Check) -> None:
        self._checks[name] = check

    def remove(self, name: str) -> None:
        self._checks.pop(name, None)

    async def _run(self, name: str, check: Check) -> CheckResult:
        try:
            async with asyncio.timeout(self.timeout):
                return await check()
        except TimeoutError:
            return CheckResult(False, {"error": "check timed out"})
        except Exception as exc:
            # The detail goes to the log; the probe only needs to know it failed.
            log.warning("readiness check failed", check=name, error=repr(exc))
            return CheckResult(False, {"error": "check failed"})

    async def report(self) -> tuple[bool, dict[str, Any]]:
        names = list(self._checks)
        results = await asyncio.gather(*(self._run(n, self._checks[n]) for n in names))
        checks = {
            name: {"status": "up" if result.ok else "down", **result.detail}
            for name, result in zip(names, results, strict=True)
        }
        ready = all(result.ok for result in results)
        return ready, {"status": "ready" if ready else "not_ready", "checks": checks}
