"""The edge as real processes (auth, a trivial upstream, N gateways) and the load that measures
its rate limits. Shared by `tests/e2e/test_limits.py` and `bench/limits.py`, so the benchmark's
accuracy figure comes from exactly the scenario the test checks.

Everything listens on 127.0.0.1 and every process started here is stopped on exit.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import orjson
from pydantic import SecretStr
from redis.asyncio import Redis

from narthex.auth.database import migrate
from narthex.auth.service import AuthService
from narthex.auth.settings import AuthSettings
from narthex.auth.signing import SigningKeyRing
from narthex.auth.store import AuthStore
from narthex.testing import processes
from narthex.testing.checkout import ROOT
from narthex.testing.processes import HOST, Service, Spec, module_argv
from narthex.testing.servers import PrivateRedis, private_redis

__all__ = [
    "DAILY_REMAINING",
    "HOST",
    "INFERENCE_IDENTITY",
    "KEY_PEPPER",
    "ONE_ITEM",
    "PREDICT",
    "ROOT",
    "Admin",
    "Edge",
    "Ledger",
    "PlanNumbers",
    "PrivateRedis",
    "Spec",
    "Tenant",
    "TenantRun",
    "accuracy_run",
    "bootstrap",
    "edge",
    "exchange",
    "features_spec",
    "format_run",
    "gateway_spec",
    "inference_spec",
    "module_argv",
    "private_redis",
    "provision_inference",
    "running",
]

KEY_PEPPER = "e2e-limits-pepper-0123456789"
# The inference service's identity, named as `narthex up` names it.
INFERENCE_IDENTITY = "service-inference"
# A limited route whose cost is the number of `instances`; the trivial upstream answers 200.
PREDICT = "/v1/models/x/predict"
ONE_ITEM = b'{"instances":[{}]}'
DAILY_REMAINING = re.compile(r'"daily";r=(\d+)')


# -- processes: narthex.testing's launcher, run from the repository root ------------------------


@contextmanager
def running(
    specs: Sequence[Spec], directory: Path, timeout: float = 60.0
) -> Iterator[list[Service]]:
    """Start every spec at once, wait until each answers 200 on its ready path, stop them
    all on exit; from the repository root, so `python -m bench.upstream` resolves."""
    with processes.running(specs, directory, timeout, cwd=ROOT) as services:
        yield services


def gateway_spec(label: str, auth_url: str, upstream_url: str, **env: str) -> Spec:
    """A gateway whose every internal upstream but auth is the trivial upstream."""
    return Spec(
        label,
        module_argv("narthex.gateway"),
        {
            "NARTHEX_GATEWAY_HOST": HOST,
            "NARTHEX_GATEWAY_PORT": "{port}",
            "NARTHEX_GATEWAY_ENV": "dev",
            "NARTHEX_GATEWAY_AUTH_URL": auth_url,
            "NARTHEX_GATEWAY_INFERENCE_URL": upstream_url,
            "NARTHEX_GATEWAY_FEATURES_URL": upstream_url,
            "NARTHEX_GATEWAY_ANALYTICS_URL": upstream_url,
            **{f"NARTHEX_GATEWAY_{name.upper()}": value for name, value in env.items()},
        },
    )


def inference_spec(label: str, auth_url: str, repository: Path, **env: str) -> Spec:
    """An inference service serving `repository`, checking tokens against `auth_url`."""
    return Spec(
        label,
        module_argv("narthex.inference"),
        {
            "NARTHEX_INFERENCE_HOST": HOST,
            "NARTHEX_INFERENCE_PORT": "{port}",
            "NARTHEX_INFERENCE_ENV": "dev",
            "NARTHEX_INFERENCE_AUTH_URL": auth_url,
            "NARTHEX_INFERENCE_MODEL_REPOSITORY": str(repository),
            **{f"NARTHEX_INFERENCE_{name.upper()}": value for name, value in env.items()},
        },
    )


def features_spec(label: str, auth_url: str, redis_url: str, prefix: str) -> Spec:
    """The features service on the Redis at `redis_url`, its keys under `prefix`."""
    return Spec(
        label,
        module_argv("narthex.features"),
        {
            "NARTHEX_FEATURES_HOST": HOST,
            "NARTHEX_FEATURES_PORT": "{port}",
            "NARTHEX_FEATURES_ENV": "dev",
            "NARTHEX_FEATURES_AUTH_URL": auth_url,
            "NARTHEX_FEATURES_REDIS_URL": redis_url,
            "NARTHEX_FEATURES_REDIS_PREFIX": prefix,
        },
    )


def exchange(url: str, api_key: str) -> str:
    """A JWT for `api_key` from the token endpoint at `url` (auth itself, or a gateway)."""
    response = httpx.post(url + "/v1/auth/token", headers={"X-API-Key": api_key}, timeout=10)
    response.raise_for_status()
    token: str = response.json()["access_token"]
    return token


# -- the platform: auth + trivial upstream, an operator with an admin key ----------------------


@dataclass(frozen=True)
class Edge:
    auth: Service
    upstream: Service
    admin_tenant_id: str
    admin_key: str
    directory: Path
    # The inference service's own key (its service identity, as `narthex up` makes it).
    inference_key: str

    def gateway(self, label: str, **env: str) -> Spec:
        return gateway_spec(label, self.auth.url, self.upstream.url, **env)

    def inference(self, label: str, repository: Path, **env: str) -> Spec:
        """An inference service reading features with its own credential."""
        return inference_spec(
            label, self.auth.url, repository, service_key=self.inference_key, **env
        )


@asynccontextmanager
async def _auth_service(database_url: str, keys_dir: Path) -> AsyncIterator[AuthService]:
    """An AuthService straight on the (migrated) auth database, as the CLI uses one."""
    await migrate(database_url)
    settings = AuthSettings(
        env="dev",
        database_url=database_url,
        signing_keys_dir=keys_dir,
        key_pepper=SecretStr(KEY_PEPPER),
    )
    store = await AuthStore.open(database_url)
    try:
        yield AuthService(store, SigningKeyRing(keys_dir, generate=True), settings)
    finally:
        await store.close()


async def bootstrap(database_url: str, keys_dir: Path) -> tuple[str, str]:
    """The operator tenant and its admin key, written straight into the auth database."""
    async with _auth_service(database_url, keys_dir) as service:
        tenant, key = await service.bootstrap()
    return tenant.id, str(key)


async def provision_inference(database_url: str, keys_dir: Path) -> str:
    """The inference service's identity (role service) and a fresh key for it, as
    `narthex up` provisions them, written straight into the auth database."""
    async with _auth_service(database_url, keys_dir) as service:
        identity = await service.ensure_service(INFERENCE_IDENTITY, actor="tests")
        key, _ = await service.fresh_key(identity.id, "tests", actor="tests")
    return str(key)


@contextmanager
def edge(directory: Path) -> Iterator[Edge]:
    """auth (SQLite in `directory`) and the trivial upstream (`bench.upstream`), running."""
    database_url = f"sqlite+aiosqlite:///{directory / 'auth.db'}"
    keys_dir = directory / "keys"
    tenant_id, admin_key = asyncio.run(bootstrap(database_url, keys_dir))
    inference_key = asyncio.run(provision_inference(database_url, keys_dir))
    auth = Spec(
        "auth",
        module_argv("narthex.auth"),
        {
            "NARTHEX_AUTH_HOST": HOST,
            "NARTHEX_AUTH_PORT": "{port}",
            "NARTHEX_AUTH_ENV": "dev",
            "NARTHEX_AUTH_DATABASE_URL": database_url,
            "NARTHEX_AUTH_SIGNING_KEYS_DIR": str(keys_dir),
            "NARTHEX_AUTH_KEY_PEPPER": KEY_PEPPER,
        },
    )
    upstream = Spec(
        "upstream", module_argv("bench.upstream", "--host", HOST, "--port", "{port}"), {}
    )
    with running([auth, upstream], directory) as (auth_service, upstream_service):
        yield Edge(auth_service, upstream_service, tenant_id, admin_key, directory, inference_key)


# -- administration through a gateway ----------------------------------------------------------


@dataclass(frozen=True)
class PlanNumbers:
    rate: float
    burst: int
    daily_quota: int = 10_000_000
    max_items: int = 100
    allowed_models: tuple[str, ...] = ()  # empty: every model


@dataclass(frozen=True)
class Tenant:
    id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.key}


class Admin:
    """The operator's admin API calls, through a gateway, with the admin key."""

    def __init__(self, gateway_url: str, admin_key: str) -> None:
        self.client = httpx.Client(
            base_url=gateway_url, headers={"X-API-Key": admin_key}, timeout=10.0
        )

    def close(self) -> None:
        self.client.close()

    def create_plan(self, prefix: str, numbers: PlanNumbers) -> str:
        name = f"{prefix}-{secrets.token_hex(4)}"
        response = self.client.post(
            "/v1/admin/plans",
            json={
                "name": name,
                "rate_per_second": numbers.rate,
                "burst": numbers.burst,
                "daily_quota": numbers.daily_quota,
                "max_items_per_request": numbers.max_items,
                "allowed_models": list(numbers.allowed_models),
            },
        )
        assert response.status_code == 201, response.text
        return name

    def create_tenant(self, prefix: str, plan: str) -> Tenant:
        response = self.client.post(
            "/v1/admin/tenants",
            json={"name": f"{prefix}-{secrets.token_hex(4)}", "plan": plan, "roles": ["tenant"]},
        )
        assert response.status_code == 201, response.text
        tenant_id = response.json()["id"]
        response = self.client.post(f"/v1/admin/tenants/{tenant_id}/keys", json={"name": "k"})
        assert response.status_code == 201, response.text
        return Tenant(tenant_id, response.json()["key"])

    def set_plan(self, tenant_id: str, plan: str) -> None:
        response = self.client.patch(f"/v1/admin/tenants/{tenant_id}", json={"plan": plan})
        assert response.status_code == 200, response.text


class Ledger:
    """A tenant's daily quota as a gateway reports it: what each request was charged. The
    daily quota does not refill within the day, so the differences are exact."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.remaining = self.quota()

    def quota(self) -> int:
        response = self.client.get("/v1/quota")
        assert response.status_code == 200, response.text
        remaining: int = response.json()["daily"]["remaining"]
        return remaining

    def charged(self, response: httpx.Response) -> int:
        """Items this response's request was charged, and everything charged unseen before."""
        match = DAILY_REMAINING.search(response.headers.get("ratelimit", ""))
        assert match is not None, f"no RateLimit header on {response.status_code}"
        remaining = int(match.group(1))
        charged, self.remaining = self.remaining - remaining, remaining
        return charged


# -- load: many clients of one tenant, spread over gateways ------------------------------------


@dataclass
class TenantRun:
    """What one tenant's clients saw, and the limiter's window for it (Redis server time)."""

    clients: int
    statuses: Counter[int] = field(default_factory=Counter)
    admitted_by_gateway: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    refusal_types: Counter[str] = field(default_factory=Counter)
    first_send: float = float("inf")  # time.monotonic()
    last_recv: float = 0.0
    # Set after the run: Redis TIME read before the first request was sent, and the
    # bucket's `ts`, the Redis time of the last admitted decision.
    window_start: float = 0.0
    window_end: float = 0.0
    # Redis time of the first admission, as seen by polling the bucket from the start:
    # on a loaded machine the first request can reach Redis a while after `window_start`,
    # and a full bucket cannot bank what refills meanwhile, so a lower bound on what was
    # admitted must count from here (the upper bound counts from `window_start`).
    first_admission: float = 0.0

    @property
    def admitted(self) -> int:  # every request costs one item
        return self.statuses[200]

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    @property
    def elapsed(self) -> float:
        """The limiter's window: from before the first request to its last admission."""
        return self.window_end - self.window_start

    @property
    def admitting(self) -> float:
        """From the first admission to the last (Redis time)."""
        return self.window_end - self.first_admission

    @property
    def client_elapsed(self) -> float:
        """The clients' window: first request sent to last response received."""
        return self.last_recv - self.first_send

    def allowed(self, plan: PlanNumbers, elapsed: float | None = None) -> float:
        return plan.burst + plan.rate * (self.elapsed if elapsed is None else elapsed)

    def ratio(self, plan: PlanNumbers, elapsed: float | None = None) -> float:
        return self.admitted / self.allowed(plan, elapsed)


class _Start:
    """A starting line: clients arrive when warm; the run starts once all have arrived."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.all_here = asyncio.Event()
        self.go = asyncio.Event()

    async def arrive(self) -> None:
        self.count -= 1
        if self.count == 0:
            self.all_here.set()
        await self.go.wait()

    async def everyone_ready(self, tasks: Sequence[asyncio.Task[None]]) -> None:
        waiter = asyncio.ensure_future(self.all_here.wait())
        await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        for task in tasks:  # a client that failed before the start: raise its error now
            if task.done():
                task.result()


async def _first_admission(redis: Redis, bucket: str, run: TenantRun) -> None:
    """Poll the bucket until it exists (it is written on the first admission)."""
    for _ in range(20_000):
        ts = await redis.hget(bucket, "ts")
        if ts is not None:
            run.first_admission = float(ts)
            return
        await asyncio.sleep(0.001)


async def _client_loop(
    client: aiohttp.ClientSession,
    label: str,
    headers: Mapping[str, str],
    run: TenantRun,
    start: _Start,
    stop_at: list[float],
) -> None:
    # One request first, off the clock: opens this client's connection and warms the
    # gateway's key and plan caches. /v1/quota consumes nothing.
    async with client.get("/v1/quota", headers=headers) as warm:
        if warm.status != 200:
            run.errors.append(f"warm-up {label}: {warm.status} {(await warm.text())[:200]}")
        await warm.read()
    await start.arrive()
    while time.monotonic() < stop_at[0]:
        sent = time.monotonic()
        try:
            async with client.post(PREDICT, headers=headers, data=ONE_ITEM) as response:
                body = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            run.errors.append(f"{label}: {exc!r}")
            await asyncio.sleep(0.01)
            continue
        received = time.monotonic()
        run.first_send = min(run.first_send, sent)
        run.last_recv = max(run.last_recv, received)
        run.statuses[response.status] += 1
        if response.status == 200:
            run.admitted_by_gateway[label] += 1
        elif response.status == 429:
            run.refusal_types[str(orjson.loads(body).get("type", "")).rsplit("/", 1)[-1]] += 1


async def accuracy_run(
    gateway_urls: Sequence[str],
    redis: Redis,
    prefix: str,
    plan: PlanNumbers,
    tenants: Sequence[tuple[Tenant, int]],
    duration: float,
) -> list[TenantRun]:
    """`clients` concurrent clients per tenant, round-robin over the gateways, each sending
    cost-1 requests back to back for `duration` seconds; one `TenantRun` per tenant.

    The clients are aiohttp sessions of one connection each, in this one process. httpx
    was tried first: at ~1.6 ms of CPU a request it made this process the bottleneck
    (~600 requests/s in all), so that the 200 clients' first requests reached the
    gateways over ~0.15 s, refill the bucket (still full then) could not hold. The
    limiter's window is taken in Redis server time: `TIME` just before the start, and
    the bucket's own timestamp of its last admission after the end.
    """
    runs = [TenantRun(clients) for _, clients in tenants]
    stop_at = [float("inf")]
    start = _Start(sum(clients for _, clients in tenants))
    tasks: list[asyncio.Task[None]] = []
    async with AsyncExitStack() as stack:
        for (tenant, clients), run in zip(tenants, runs, strict=True):
            for i in range(clients):
                gateway = i % len(gateway_urls)
                session = await stack.enter_async_context(
                    aiohttp.ClientSession(
                        base_url=gateway_urls[gateway],
                        timeout=aiohttp.ClientTimeout(total=30.0),
                        connector=aiohttp.TCPConnector(limit=1),
                    )
                )
                tasks.append(
                    asyncio.create_task(
                        _client_loop(session, f"gw{gateway}", tenant.headers, run, start, stop_at)
                    )
                )
        try:
            # Wait until every client has its connection and the caches are warm.
            await start.everyone_ready(tasks)
            seconds, micros = await redis.time()
            for run in runs:
                run.window_start = seconds + micros / 1e6
            stop_at[0] = time.monotonic() + duration
            start.go.set()
            watchers = [
                asyncio.create_task(
                    _first_admission(redis, f"{prefix}:{{{tenant.id}}}:bucket", run)
                )
                for (tenant, _), run in zip(tenants, runs, strict=True)
            ]
            await asyncio.gather(*tasks)
            await asyncio.gather(*watchers)
        finally:  # on failure, no client outlives its session
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for (tenant, _), run in zip(tenants, runs, strict=True):
            state = await redis.hmget(f"{prefix}:{{{tenant.id}}}:bucket", ["tokens", "ts"])
            if state[1] is not None:
                run.window_end = float(state[1])
    return runs


def format_run(name: str, run: TenantRun, plan: PlanNumbers) -> str:
    return (
        f"tenant {name}: {run.clients} clients, admitted {run.admitted} items in"
        f" {run.elapsed:.3f} s (limiter window; clients' window {run.client_elapsed:.3f} s);"
        f" allowed burst + rate x elapsed = {run.allowed(plan):.1f};"
        f" ratio {run.ratio(plan):.4f}"
        f" (clients' window: {run.ratio(plan, run.client_elapsed):.4f};"
        f" from the first admission, {run.first_admission - run.window_start:.3f} s in:"
        f" {run.ratio(plan, run.admitting):.4f});"
        f" statuses {dict(sorted(run.statuses.items()))}"
    )
