"""One tenant floods inference while another sends a small request every 200 ms: the scenario
of issue 10, shared by `tests/e2e/test_fairness.py` (which asserts only that the other
tenant sees no error) and `bench/fairness.py` (which prints its latencies), so that the
benchmark measures exactly what the test checks.

The stack is real processes on loopback: auth, inference serving `minilm`, and a gateway in
front of it (its limiter on the local Redis under a private prefix). The flooder is on a
plan large enough that the gateway never limits it; it runs 40 clients, each sending
100-text embedding requests back to back and, like an abusive client, retrying a refusal at
once instead of honouring `Retry-After`. The quiet tenant sends one one-text request every
200 ms. Everything stops by itself.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

from narthex.testing.models import builtin_repository
from narthex.testing.platform import (
    Admin,
    Edge,
    PlanNumbers,
    Tenant,
    edge,
    exchange,
    gateway_spec,
    inference_spec,
    running,
)
from narthex.testing.processes import Service
from narthex.testing.redis import REDIS_URL, redis_scratch
from narthex.testing.texts import texts

__all__ = [
    "EMBEDDINGS",
    "FLOOD_CLIENTS",
    "FLOOD_PLAN",
    "FLOOD_TEXTS",
    "QUIET_INTERVAL",
    "QUIET_PLAN",
    "FloodStack",
    "Traffic",
    "embedding_body",
    "flood",
    "flood_stack",
    "quiet_alone",
]

FLOOD_CLIENTS = 40
FLOOD_TEXTS = 100
QUIET_INTERVAL = 0.2
EMBEDDINGS = "/v1/embeddings"
# Within its plan: the gateway admits every request of the flood.
FLOOD_PLAN = PlanNumbers(rate=100_000.0, burst=1_000_000, daily_quota=2_000_000_000)
QUIET_PLAN = PlanNumbers(rate=50.0, burst=50)
_KEPT_ERRORS = 20


def embedding_body(count: int, seed: int) -> bytes:
    return orjson.dumps({"model": "minilm", "input": texts(count, seed=seed)})


# -- the stack -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FloodStack:
    auth: Service
    inference: Service
    gateway: Service
    flooder: Tenant
    quiet: Tenant
    jwts: Mapping[str, str]  # tenant id -> a JWT from auth, for calling inference directly

    def headers(self, tenant: Tenant, *, through_gateway: bool) -> dict[str, str]:
        """The gateway takes the API key; inference takes the tenant's JWT."""
        json = {"Content-Type": "application/json"}
        if through_gateway:
            return {"X-API-Key": tenant.key, **json}
        return {"Authorization": f"Bearer {self.jwts[tenant.id]}", **json}

    def url(self, *, through_gateway: bool) -> str:
        return self.gateway.url if through_gateway else self.inference.url


@contextmanager
def inference_behind_gateway(
    directory: Path, repository: Path, models: str, *, timeout: float = 60.0
) -> Iterator[tuple[Edge, Service, Service]]:
    """The edge's auth, inference serving `models` from `repository`, and a gateway in front
    of it whose limiter uses the local Redis under a scratch prefix (deleted after)."""
    # One event loop for the Redis scratch client's whole life (it deletes the prefix).
    with asyncio.Runner() as runner, ExitStack() as stack:
        scratch_context = redis_scratch()
        scratch = runner.run(scratch_context.__aenter__())
        stack.callback(lambda: runner.run(scratch_context.__aexit__(None, None, None)))
        platform = stack.enter_context(edge(directory))
        spec = inference_spec("inference", platform.auth.url, repository, models=models)
        (inference,) = stack.enter_context(running([spec], directory, timeout=timeout))
        gateway_process = gateway_spec(
            "gateway",
            platform.auth.url,
            platform.upstream.url,
            inference_url=inference.url,
            redis_url=REDIS_URL,
            ratelimit_prefix=scratch.prefix,
        )
        (gateway,) = stack.enter_context(running([gateway_process], directory))
        yield platform, inference, gateway


@contextmanager
def flood_stack(directory: Path) -> Iterator[FloodStack]:
    """auth, inference (minilm), a gateway in front of it; the two tenants and their keys."""
    repository = builtin_repository(["minilm"])
    with inference_behind_gateway(directory, repository, "minilm", timeout=120) as (
        platform,
        inference,
        gateway,
    ):
        admin = Admin(gateway.url, platform.admin_key)
        try:
            flooder = admin.create_tenant("flooder", admin.create_plan("flood", FLOOD_PLAN))
            quiet = admin.create_tenant("quiet", admin.create_plan("quiet", QUIET_PLAN))
        finally:
            admin.close()
        jwts = {t.id: exchange(platform.auth.url, t.key) for t in (flooder, quiet)}
        yield FloodStack(platform.auth, inference, gateway, flooder, quiet, jwts)


# -- the traffic -----------------------------------------------------------------------------


@dataclass
class Traffic:
    """What one tenant's clients saw."""

    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds, of each 200
    errors: list[str] = field(default_factory=list)  # the first few failures, described
    transport_errors: int = 0
    without_retry_after: int = 0  # 503s and 429s that did not say when to come back

    @property
    def served(self) -> int:
        return self.statuses[200]

    @property
    def failed(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != 200) + (
            self.transport_errors
        )

    def percentile(self, q: float) -> float:
        """The q-th percentile of the answered requests' latencies, in seconds (nearest
        rank: with few samples, p99 is the slowest one, never an interpolation below it)."""
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]

    def note(self, failure: str) -> None:
        if len(self.errors) < _KEPT_ERRORS:
            self.errors.append(failure)


async def _send(
    session: aiohttp.ClientSession, headers: Mapping[str, str], body: bytes, traffic: Traffic
) -> None:
    started = time.monotonic()
    try:
        async with session.post(EMBEDDINGS, data=body, headers=headers) as response:
            answer = await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        traffic.transport_errors += 1
        traffic.note(repr(exc))
        return
    traffic.statuses[response.status] += 1
    if response.status == 200:
        traffic.latencies.append(time.monotonic() - started)
        return
    traffic.note(f"{response.status} {answer[:300]!r}")
    if response.status in (429, 503) and "Retry-After" not in response.headers:
        traffic.without_retry_after += 1


async def _steady(
    session: aiohttp.ClientSession,
    headers: Mapping[str, str],
    until: float,
    interval: float,
    traffic: Traffic,
) -> None:
    """One one-text request every `interval` seconds (the next one as soon as the last is
    answered, if that took longer)."""
    sent = 0
    while (start := time.monotonic()) < until:
        await _send(session, headers, embedding_body(1, seed=sent), traffic)
        sent += 1
        await asyncio.sleep(max(0.0, start + interval - time.monotonic()))


async def _hammer(
    session: aiohttp.ClientSession, headers: Mapping[str, str], until: float, traffic: Traffic
) -> None:
    """Requests back to back; a refusal is retried at once."""
    body = embedding_body(FLOOD_TEXTS, seed=id(session) % 1000)
    while time.monotonic() < until:
        await _send(session, headers, body, traffic)


def _session(base_url: str) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        base_url=base_url,
        timeout=aiohttp.ClientTimeout(total=30.0),
        connector=aiohttp.TCPConnector(limit=1),
    )


async def _warm(session: aiohttp.ClientSession, headers: Mapping[str, str]) -> None:
    """One request off the clock: the connection, and the gateway's key and plan caches."""
    warm = Traffic()
    await _send(session, headers, embedding_body(1, seed=10_000), warm)
    if warm.failed:
        raise RuntimeError(f"warm-up request failed: {warm.errors}")


async def quiet_alone(
    stack: FloodStack, seconds: float, *, through_gateway: bool, interval: float = QUIET_INTERVAL
) -> Traffic:
    """The quiet tenant alone: its unloaded latency."""
    traffic = Traffic()
    headers = stack.headers(stack.quiet, through_gateway=through_gateway)
    async with _session(stack.url(through_gateway=through_gateway)) as session:
        await _warm(session, headers)
        await _steady(session, headers, time.monotonic() + seconds, interval, traffic)
    return traffic


async def flood(
    stack: FloodStack,
    seconds: float,
    *,
    through_gateway: bool,
    clients: int = FLOOD_CLIENTS,
    interval: float = QUIET_INTERVAL,
) -> tuple[Traffic, Traffic]:
    """The flood and the quiet tenant at once, for `seconds`: (quiet, flooder) traffic. The
    quiet tenant starts once the flood has filled inference's queue."""
    url = stack.url(through_gateway=through_gateway)
    quiet, flooder = Traffic(), Traffic()
    quiet_headers = stack.headers(stack.quiet, through_gateway=through_gateway)
    flood_headers = stack.headers(stack.flooder, through_gateway=through_gateway)
    sessions = [_session(url) for _ in range(clients + 1)]
    try:
        for session in sessions:
            await _warm(session, flood_headers if session is not sessions[0] else quiet_headers)
        flood_until = time.monotonic() + seconds + 1.0
        hammers = [
            asyncio.create_task(_hammer(session, flood_headers, flood_until, flooder))
            for session in sessions[1:]
        ]
        await asyncio.sleep(1.0)  # the queue fills
        await _steady(sessions[0], quiet_headers, time.monotonic() + seconds, interval, quiet)
        await asyncio.gather(*hammers)
    finally:
        for session in sessions:
            await session.close()
    return quiet, flooder
