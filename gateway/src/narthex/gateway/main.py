"""App factory of the gateway: one ServiceClient per upstream, the route table, the proxy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI
from starlette.middleware import Middleware

from narthex.common.app import service_app
from narthex.common.authn import verifier_for
from narthex.common.http import ServiceClient
from narthex.common.readiness import CheckResult
from narthex.gateway.guard import ClientGuard
from narthex.gateway.identity import Identity
from narthex.gateway.limits import RedisLimiter
from narthex.gateway.plans import PlanBook
from narthex.gateway.proxy import ProxyMiddleware
from narthex.gateway.ratelimit import EdgeLimiter, LimiterMetrics
from narthex.gateway.resp import PipelinedRedis
from narthex.gateway.routes import router
from narthex.gateway.routing import RouteTable
from narthex.gateway.settings import GatewaySettings
from narthex.gateway.state import app_identity, app_limits


def upstream_check(client: ServiceClient):  # type: ignore[no-untyped-def]
    async def check() -> CheckResult:
        detail: dict[str, object] = {"breaker": client.breaker.state}
        try:
            response = await client.get("/readyz", deadline=1.0)
        except Exception:
            return CheckResult(False, detail)
        detail["http_status"] = response.status_code
        return CheckResult(response.status_code == 200, detail)

    return check


@asynccontextmanager
async def shared_redis(url: str) -> AsyncIterator[PipelinedRedis]:
    # Short timeouts: a Redis that does not answer is treated as down fast, and the
    # limiter's failure policy takes over. The connection is made on first use, and again
    # after a failure, so a gateway starts and recovers without Redis being there.
    client = PipelinedRedis.from_url(url, timeout=0.5, connect_timeout=0.5)
    try:
        yield client
    finally:
        await client.aclose()


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    clients: dict[str, ServiceClient] = {}
    guard = ClientGuard(
        settings.token_exchange_limit,
        trusted=settings.trusted_proxies,
        storage_uri=settings.redis_url,
        prefix=f"{settings.ratelimit_prefix}:guard",
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            policy = settings.client_policy()
            for name, url in settings.upstream_urls().items():
                client = await stack.enter_async_context(ServiceClient(name, url, policy))
                clients[name] = client
                app.state.readiness.add(name, upstream_check(client))
            auth = clients["auth"]

            app.state.identity = Identity(
                verifier_for(auth, settings),
                auth,
                revalidate_seconds=settings.api_key_revalidate_seconds,
            )
            app.state.plans = PlanBook(auth, ttl=settings.plan_cache_seconds)
            shared = None
            if settings.redis_url:
                redis = await stack.enter_async_context(shared_redis(settings.redis_url))
                shared = RedisLimiter(redis, prefix=settings.ratelimit_prefix)
            app.state.limiter = EdgeLimiter(
                shared,
                LimiterMetrics(app.state.metrics_registry),
                failure_mode=settings.ratelimit_failure_mode,
                replicas=settings.replicas,
            )
            yield
            clients.clear()

    app = service_app(
        settings,
        title="narthex gateway",
        description="Public edge of narthex: authentication, rate limits, quotas, routing.",
        lifespan=lifespan,
        middleware=[
            Middleware(
                ProxyMiddleware,
                table=RouteTable(),
                clients=clients,
                identity=app_identity,
                limits=app_limits,
                max_body_bytes=settings.max_body_bytes,
                guard=guard,
                max_decoded_bytes=settings.max_decoded_body_bytes,
            )
        ],
    )
    app.state.clients = clients
    app.state.guard = guard
    app.include_router(router)
    return app
