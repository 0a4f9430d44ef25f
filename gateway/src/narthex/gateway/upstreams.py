"""Each upstream's health as the gateway last saw it: probed in the background, read by the
status routes and `/readyz`, never probed on a client's behalf."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from narthex.common.http import ServiceClient
from narthex.common.readiness import Check, CheckResult, Watcher


class UpstreamHealth:
    """One `/readyz` probe per upstream per round, around the traffic breakers.

    Probes go around the breakers both ways: an open breaker does not stop them (they
    are how an operator sees the upstream is back), and their results do not feed it
    (the breaker judges traffic; a probe is not traffic, and no client causes it).
    """

    def __init__(
        self,
        clients: Mapping[str, ServiceClient],
        *,
        timeout: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clients = clients
        self.timeout = timeout
        self.watcher = Watcher(
            {name: self._probe(client) for name, client in clients.items()},
            timeout=timeout,
            clock=clock,
        )

    def _probe(self, client: ServiceClient) -> Check:
        async def probe() -> CheckResult:
            try:
                response = await client.probe("/readyz", self.timeout)
            except httpx.HTTPError as exc:
                return CheckResult(False, {"error": type(exc).__name__})
            return CheckResult(response.status_code == 200, {"http_status": response.status_code})

        return probe

    async def poll(self) -> None:
        await self.watcher.poll()

    def breaker(self, name: str) -> dict[str, Any]:
        return {"breaker": self.clients[name].breaker.state}

    def readiness_check(self, name: str) -> Check:
        return self.watcher.check(name, lambda: self.breaker(name))

    def status(self, name: str) -> tuple[bool, dict[str, Any]]:
        """(up, report) for `name` from the last round: what `/v1/status/{name}` answers."""
        report: dict[str, Any] = {"upstream": name, **self.breaker(name)}
        observation = self.watcher.last(name)
        if observation is None:
            return False, {**report, "status": "unknown"}
        report["status"] = "up" if observation.ok else "down"
        report.update(observation.detail)
        report["checked_seconds_ago"] = round(self.watcher.age(observation), 3)
        return observation.ok, report
