"""The features app through its factory and lifespan, on the memory store or a scratch Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI

from narthex.features.main import create_app
from narthex.features.settings import FeaturesSettings
from narthex.features.store import FeatureStore
from tests.support import tokens
from tests.support.redis import REDIS_URL, RedisScratch, redis_scratch
from tests.support.tokens import static_verifier

BACKENDS = ("memory", "redis")


def bearer(*scopes: str) -> dict[str, str]:
    return tokens.bearer(["tenant"], scopes)


PRODUCER = bearer("events")
INFERENCE = bearer("inference")


@dataclass
class Serving:
    app: FastAPI
    client: httpx.AsyncClient
    scratch: RedisScratch | None

    @property
    def store(self) -> FeatureStore:
        store: FeatureStore = self.app.state.store
        return store

    async def ingest(self, events: list[Any], **kwargs: Any) -> httpx.Response:
        return await self.client.post(
            "/v1/events/transactions", json={"events": events}, headers=PRODUCER, **kwargs
        )

    async def batch_get(self, entities: list[str], at: float | None = None) -> httpx.Response:
        body: dict[str, Any] = {"entities": entities}
        if at is not None:
            body["at"] = at
        return await self.client.post(
            "/internal/v1/features:batchGet", json=body, headers=INFERENCE
        )

    async def redis_keys(self) -> list[bytes]:
        """Every key the app wrote under its prefix (none for the memory store)."""
        if self.scratch is None:
            return []
        pattern = f"{self.scratch.prefix}:*"
        return [key async for key in self.scratch.client.scan_iter(match=pattern)]


@asynccontextmanager
async def serving(backend: str = "memory", **settings: Any) -> AsyncIterator[Serving]:
    async with AsyncExitStack() as stack:
        scratch = None
        if backend == "redis":
            scratch = await stack.enter_async_context(redis_scratch())
            settings = {"redis_url": REDIS_URL, "redis_prefix": scratch.prefix, **settings}
        config = FeaturesSettings(tracing=False, **settings)
        app = create_app(config, verifier=static_verifier)
        await stack.enter_async_context(app.router.lifespan_context(app))
        client = await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://features")
        )
        yield Serving(app, client, scratch)
