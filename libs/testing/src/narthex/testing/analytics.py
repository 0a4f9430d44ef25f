"""The analytics service as a real process that a test may SIGKILL and restart on the same
port, mixed-outcome load through a gateway, and reading a gateway's event counters. Shared by
`tests/e2e/test_usage.py` and `bench/analytics.py`."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from narthex.testing.databases import postgres_database, sqlite_url
from narthex.testing.platform import (
    HOST,
    ONE_ITEM,
    PREDICT,
    ROOT,
    Admin,
    Edge,
    PlanNumbers,
    PrivateRedis,
    Tenant,
    edge,
    module_argv,
    running,
)
from narthex.testing.processes import Restartable, Service, Spec

__all__ = [
    "PLAN",
    "AnalyticsProcess",
    "LoadResult",
    "UsageStack",
    "metric_sum",
    "mixed_load",
    "usage_stack",
    "wait_for_usage",
]

# A plan the load outruns, so that some requests are refused with 429.
PLAN = PlanNumbers(rate=50.0, burst=20)


class AnalyticsProcess(Restartable):
    """`python -m narthex.analytics` on one port for its whole life, restartable."""

    def __init__(self, directory: Path, label: str, env: Mapping[str, str]) -> None:
        spec = Spec(
            label,
            module_argv("narthex.analytics"),
            {
                "NARTHEX_ANALYTICS_HOST": HOST,
                "NARTHEX_ANALYTICS_PORT": "{port}",
                "NARTHEX_ANALYTICS_ENV": "dev",
                **env,
            },
        )
        super().__init__(spec, directory, cwd=ROOT)


@dataclass
class LoadResult:
    statuses: Counter[int] = field(default_factory=Counter)
    items: int = 0  # items charged: one per admitted predict
    errors: list[str] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())


# What the i-th request is: mostly one-item predictions (200, or 429 past the plan's rate),
# some refused at the edge for their body (400: not JSON) or their role (403).
def _request(i: int) -> tuple[str, str, bytes]:
    if i % 10 == 7:
        return "POST", PREDICT, b'{"instances": ['
    if i % 10 == 8:
        return "GET", "/v1/admin/tenants", b""
    return "POST", PREDICT, ONE_ITEM


async def mixed_load(
    gateway_url: str,
    headers: Mapping[str, str],
    total: int,
    *,
    clients: int = 8,
    at: Mapping[int, Callable[[], object]] | None = None,
    stop: threading.Event | None = None,
) -> LoadResult:
    """`total` requests by `clients` concurrent clients (fewer if `stop` is set before);
    `at[n]` runs (in a thread, the load going on meanwhile) once the n-th request is sent."""
    result = LoadResult()
    counter = iter(range(total))
    actions = dict(at or {})
    running: list[asyncio.Future[object]] = []

    async def client() -> None:
        async with aiohttp.ClientSession(
            base_url=gateway_url,
            headers=dict(headers),
            timeout=aiohttp.ClientTimeout(total=60),
            connector=aiohttp.TCPConnector(limit=1),
        ) as session:
            for i in counter:
                if stop is not None and stop.is_set():
                    break
                action = actions.pop(i, None)
                if action is not None:
                    running.append(asyncio.ensure_future(asyncio.to_thread(action)))
                method, path, body = _request(i)
                try:
                    async with session.request(method, path, data=body or None) as response:
                        await response.read()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    result.errors.append(repr(exc))
                    continue
                result.statuses[response.status] += 1
                if response.status == 200 and path == PREDICT:
                    result.items += 1

    await asyncio.gather(*(client() for _ in range(clients)))
    await asyncio.gather(*running)
    return result


def metric_sum(url: str, name: str, **labels: str) -> float:
    """The sum of a counter's samples on a service's /metrics whose labels include `labels`."""
    text = httpx.get(url + "/metrics", timeout=5).text
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$")
    for line in text.splitlines():
        match = pattern.match(line)
        if match is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def wait_for_usage(
    gateway_url: str,
    admin_key: str,
    tenant: str,
    requests: int,
    timeout: float = 90.0,
) -> dict[str, Any]:
    """The tenant's usage totals once they count `requests` (or whatever they are at the end
    of `timeout`: the caller's assertion then says what is missing)."""
    deadline = time.monotonic() + timeout
    totals: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = httpx.get(
            gateway_url + "/v1/admin/usage",
            params={"tenant": tenant, "granularity": "day"},
            headers={"X-API-Key": admin_key},
            timeout=10,
        )
        if response.status_code == 200:
            totals = response.json()["totals"]
            if totals["requests"] == requests:
                return totals
        time.sleep(0.5)
    return totals


@dataclass
class UsageStack:
    edge: Edge
    redis: PrivateRedis
    gateway: Service
    analytics: list[AnalyticsProcess]
    admin: Admin
    tenant: Tenant
    plan: str


@contextmanager
def usage_stack(directory: Path, replicas: int = 1, **gateway_env: str) -> Iterator[UsageStack]:
    """A private append-only redis-server, auth, the trivial upstream, `replicas` analytics
    processes (SQLite for one, a PostgreSQL database of its own for more) and a gateway
    whose limits and usage events use that Redis; a tenant on PLAN."""
    with ExitStack() as stack:
        redis = PrivateRedis(directory, ["--appendonly", "yes"])
        redis.start()
        stack.callback(redis.stop)
        platform = stack.enter_context(edge(directory))
        if replicas == 1:
            database_url = sqlite_url(directory, "analytics.db")
        else:
            runner = stack.enter_context(asyncio.Runner())
            database = postgres_database()
            database_url = runner.run(database.__aenter__())
            stack.callback(lambda: runner.run(database.__aexit__(None, None, None)))
        analytics = []
        for i in range(replicas):
            process = AnalyticsProcess(
                directory,
                f"analytics{i}",
                {
                    "NARTHEX_ANALYTICS_AUTH_URL": platform.auth.url,
                    "NARTHEX_ANALYTICS_DATABASE_URL": database_url,
                    "NARTHEX_ANALYTICS_REDIS_URL": redis.url,
                    # A killed replica's pending entries are claimed soon after.
                    "NARTHEX_ANALYTICS_CLAIM_IDLE_SECONDS": "1",
                    "NARTHEX_ANALYTICS_CLAIM_INTERVAL_SECONDS": "0.5",
                    "NARTHEX_ANALYTICS_BLOCK_MS": "200",
                },
            )
            stack.callback(process.stop)
            process.start()
            analytics.append(process)
        (gateway,) = stack.enter_context(
            running(
                [
                    platform.gateway(
                        "gateway",
                        redis_url=redis.url,
                        analytics_url=analytics[0].url,
                        **gateway_env,
                    )
                ],
                directory,
            )
        )
        admin = Admin(gateway.url, platform.admin_key)
        stack.callback(admin.close)
        plan = admin.create_plan("usage", PLAN)
        tenant = admin.create_tenant("usage", plan)
        yield UsageStack(platform, redis, gateway, analytics, admin, tenant, plan)
