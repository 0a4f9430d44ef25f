"""App factory of the gateway: one ServiceClient per upstream, the route table, the proxy."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

from starlette.middleware import Middleware

from narthex.common.app import ServiceApp, VerifierFactory, service_app
from narthex.common.authn import verifier_for
from narthex.common.background import every
from narthex.common.events import USAGE_STREAM, event_buffers
from narthex.common.http import ServiceClient
from narthex.common.metrics import BreakerStates
from narthex.common.readiness import CheckResult
from narthex.gateway.dashboard import router as dashboard_router
from narthex.gateway.identity import Identity
from narthex.gateway.inflight import TenantInFlight
from narthex.gateway.proxy import ProxyMiddleware
from narthex.gateway.public import PublicAnswers
from narthex.gateway.ratelimit.buckets import RedisLimiter
from narthex.gateway.ratelimit.edge import EdgeLimiter, LimiterMetrics
from narthex.gateway.ratelimit.guard import ClientGuard
from narthex.gateway.ratelimit.plans import PlanBook, Plans
from narthex.gateway.resources import GatewayState
from narthex.gateway.resp import PipelinedRedis
from narthex.gateway.revocations import Revocations
from narthex.gateway.routes import router
from narthex.gateway.routing import RouteTable
from narthex.gateway.settings import GatewaySettings
from narthex.gateway.upstreams import UpstreamHealth


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


def create_app(
    settings: GatewaySettings | None = None,
    *,
    verifier: VerifierFactory | None = None,
    background: bool = True,
    clock: Callable[[], float] | None = None,
    plans: Plans | None = None,
) -> ServiceApp:
    """The gateway. Its lifespan yields a `GatewayState`, which every request finds in
    `scope["state"]`.

    `verifier` checks callers' JWTs: the auth service's JWKS (through the gateway's own
    client to auth) unless a test gives another. `background=False` starts no background
    loop (upstream probes, the revocation list, the signing keys' first load): tests then
    run each round themselves (`state["upstreams"].poll()`, `state["revocations"].poll()`).
    `clock` (Unix seconds) is the rate limiter's time instead of Redis's and this
    process's, for tests that drive time rather than wait for it. `plans` replaces the
    plans read from auth (tests whose subject is not limits)."""
    settings = settings or GatewaySettings()
    guard = ClientGuard(
        settings.token_exchange_limit,
        trusted=settings.trusted_proxies,
        storage_uri=settings.redis_url,
        prefix=f"{settings.ratelimit_prefix}:guard",
    )

    @asynccontextmanager
    async def lifespan(app: ServiceApp) -> AsyncIterator[GatewayState]:
        async with AsyncExitStack() as stack:
            policy = settings.client_policy()
            clients: dict[str, ServiceClient] = {}
            for name, url in settings.upstream_urls().items():
                clients[name] = await stack.enter_async_context(ServiceClient(name, url, policy))
            auth = clients["auth"]
            breakers = BreakerStates(lambda: {n: client.breaker for n, client in clients.items()})
            app.metrics_registry.register(breakers)
            stack.callback(app.metrics_registry.unregister, breakers)

            token_verifier = (
                verifier_for(auth, settings)
                if verifier is None
                else await stack.enter_async_context(verifier(settings))
            )
            revocations = Revocations(auth)
            identity = Identity(
                token_verifier,
                auth,
                revalidate_seconds=settings.api_key_revalidate_seconds,
                guard=guard,
                revocations=revocations,
            )
            shared = None
            if settings.redis_url:
                redis = await stack.enter_async_context(shared_redis(settings.redis_url))
                shared = RedisLimiter(redis, prefix=settings.ratelimit_prefix, clock=clock)
            limiter = EdgeLimiter(
                shared,
                LimiterMetrics(app.metrics_registry),
                failure_mode=settings.ratelimit_failure_mode,
                replicas=settings.replicas,
                clock=clock or time.time,
                monotonic=clock or time.monotonic,
            )

            usage_events = None
            events_url = settings.events_url()
            if events_url:
                buffers = await stack.enter_async_context(
                    event_buffers(
                        events_url,
                        settings.events_prefix,
                        (USAGE_STREAM,),
                        app.metrics_registry,
                        capacity=settings.events_buffer,
                    )
                )
                usage_events = buffers[USAGE_STREAM]

            upstreams = UpstreamHealth(clients, timeout=settings.status_probe_timeout)
            jwks = token_verifier.jwks

            async def signing_keys() -> CheckResult:
                # Without them no token can be checked: the one dependency this replica
                # cannot serve without, and one a replica that has them keeps using
                # while auth is away.
                return CheckResult(bool(jwks.kids), {"keys": len(jwks.kids)})

            # What the gateway needs to serve is its own state; an upstream that is
            # down is every replica's problem alike, so it is reported, not required:
            # taking replicas out of rotation would only add the routes that still work
            # to the outage.
            readiness = app.readiness
            readiness.add("signing_keys", signing_keys)
            for name in clients:
                readiness.add(name, upstreams.readiness_check(name), required=False)
            readiness.add("revocations", revocations.check, required=False)

            async def probe_round() -> None:
                await upstreams.poll()
                if not jwks.kids:
                    await jwks.refresh()

            if background:
                await stack.enter_async_context(
                    every(settings.status_poll_seconds, probe_round, name="upstream-status")
                )
                await stack.enter_async_context(
                    every(settings.revocation_poll_seconds, revocations.poll, name="revocations")
                )
            yield GatewayState(
                clients=clients,
                identity=identity,
                plans=plans or PlanBook(auth, ttl=settings.plan_cache_seconds),
                limiter=limiter,
                usage_events=usage_events,
                upstreams=upstreams,
                revocations=revocations,
                guard=guard,
            )

    app = service_app(
        settings,
        title="narthex gateway",
        description="Public edge of narthex: authentication, rate limits, quotas, routing.",
        lifespan=lifespan,
        middleware=[
            Middleware(
                ProxyMiddleware,
                table=RouteTable(),
                max_body_bytes=settings.max_body_bytes,
                guard=guard,
                max_decoded_bytes=settings.max_decoded_body_bytes,
                public=PublicAnswers(settings.public_cache_seconds),
                # A tenant past its share waits for a slot as long as any request may
                # wait for a pooled connection.
                in_flight=TenantInFlight(
                    settings.tenant_max_in_flight, wait=settings.upstream_connect_timeout
                ),
            )
        ],
    )
    app.include_router(router)
    app.include_router(dashboard_router)
    return app
