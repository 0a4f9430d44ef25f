"""The features app through its factory and lifespan, on the memory store or a scratch Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from narthex.common import scopes
from narthex.features.main import create_app
from narthex.features.routes import FeaturesState
from narthex.features.settings import FeaturesSettings
from narthex.features.store import FeatureStore
from narthex.testing.lifespan import started
from tests.support import tokens
from tests.support.redis import REDIS_URL, RedisScratch, redis_scratch
from tests.support.redis_cluster import ClusterScratch, LocalCluster, cluster_scratch
from tests.support.tokens import static_verifier

BACKENDS = ("memory", "redis")
TENANT = "t_acme"


def bearer(*granted: str, tenant: str = TENANT, role: str = scopes.TENANT) -> dict[str, str]:
    return tokens.bearer([role], granted, subject=tenant)


PRODUCER = bearer(scopes.EVENTS)
# The inference service's own credential: the only caller batchGet answers.
SERVICE = bearer(scopes.FEATURES_LOOKUP, tenant="svc-inference", role=scopes.SERVICE)


def entities(*accounts: str, tenant: str = TENANT) -> list[dict[str, str]]:
    return [{"tenant": tenant, "account": account} for account in accounts]


@dataclass
class Serving:
    state: FeaturesState
    client: httpx.AsyncClient
    scratch: RedisScratch | ClusterScratch | None

    @property
    def store(self) -> FeatureStore:
        return self.state["store"]

    async def ingest(
        self, events: list[Any], *, tenant: str = TENANT, **kwargs: Any
    ) -> httpx.Response:
        """`events` posted by a producer of `tenant`."""
        return await self.client.post(
            "/v1/events/transactions",
            json={"events": events},
            headers=bearer(scopes.EVENTS, tenant=tenant),
            **kwargs,
        )

    async def batch_get(
        self, accounts: list[str], at: float | None = None, *, tenant: str = TENANT
    ) -> httpx.Response:
        """`accounts` of `tenant`, asked for with the inference service's credential."""
        body: dict[str, Any] = {"entities": entities(*accounts, tenant=tenant)}
        if at is not None:
            body["at"] = at
        return await self.client.post("/internal/v1/features:batchGet", json=body, headers=SERVICE)

    async def redis_keys(self) -> list[bytes]:
        """Every key the app wrote under its prefix (none for the memory store)."""
        if self.scratch is None:
            return []
        pattern = f"{self.scratch.prefix}:*"
        return [key async for key in self.scratch.client.scan_iter(match=pattern)]


@asynccontextmanager
async def serving(
    backend: str = "memory", cluster: LocalCluster | None = None, **settings: Any
) -> AsyncIterator[Serving]:
    """The app on the memory store, the test Redis (`redis`), or `cluster` (`cluster`)."""
    async with AsyncExitStack() as stack:
        scratch: RedisScratch | ClusterScratch | None = None
        if backend == "redis":
            scratch = await stack.enter_async_context(redis_scratch())
            settings = {"redis_url": REDIS_URL, "redis_prefix": scratch.prefix, **settings}
        elif backend == "cluster":
            assert cluster is not None
            scratch = await stack.enter_async_context(cluster_scratch(cluster))
            settings = {
                "redis_url": cluster.url,
                "redis_cluster": True,
                "redis_prefix": scratch.prefix,
                **settings,
            }
        config = FeaturesSettings(tracing=False, env="dev", **settings)
        app = create_app(config, verifier=static_verifier)
        running = await stack.enter_async_context(started(app, FeaturesState))
        client = await stack.enter_async_context(
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=running.app), base_url="http://features"
            )
        )
        yield Serving(running.state, client, scratch)
