"""App factory of the features service: the online store in the lifespan, the routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from narthex.common.app import ServiceApp, VerifierFactory, service_app
from narthex.common.authn import remote_verifier
from narthex.common.readiness import CheckResult
from narthex.features.metrics import FeatureMetrics
from narthex.features.routes import FeaturesState, router
from narthex.features.service import FeaturesService
from narthex.features.settings import FeaturesSettings
from narthex.features.store import (
    FeatureStore,
    MemoryFeatureStore,
    RedisFeatureStore,
    redis_client,
)


def create_app(
    settings: FeaturesSettings | None = None, *, verifier: VerifierFactory | None = None
) -> ServiceApp:
    """The lifespan yields a `FeaturesState`. `verifier` checks callers' JWTs: the auth
    service's JWKS unless a test gives another."""
    settings = settings or FeaturesSettings()

    @asynccontextmanager
    async def lifespan(app: ServiceApp) -> AsyncIterator[FeaturesState]:
        async with AsyncExitStack() as stack:
            metrics = FeatureMetrics(app.metrics_registry)
            store: FeatureStore
            if settings.redis_url:
                # The pool connects on first use: the service starts without Redis, and
                # readiness says so until it answers.
                client = await stack.enter_async_context(
                    redis_client(
                        settings.redis_url,
                        cluster=settings.redis_cluster,
                        max_connections=settings.redis_max_connections,
                        wait_seconds=settings.redis_timeout,
                    )
                )
                redis_store = RedisFeatureStore(
                    client,
                    prefix=settings.redis_prefix,
                    ttl_seconds=settings.state_ttl_seconds,
                    on_conflict=metrics.store_conflicts.inc,
                    max_in_flight=(
                        settings.redis_max_connections if settings.redis_cluster else None
                    ),
                )

                async def redis_up() -> CheckResult:
                    await redis_store.ping()
                    return CheckResult(True)

                app.readiness.add("redis", redis_up)
                store = redis_store
            else:
                store = MemoryFeatureStore(ttl_seconds=settings.state_ttl_seconds)
            service = FeaturesService(
                store,
                metrics,
                max_batch_events=settings.max_batch_events,
                max_future_seconds=settings.max_future_seconds,
                max_entities=settings.max_entities,
            )
            yield FeaturesState(service=service, store=store)

    app = service_app(
        settings,
        title="narthex features",
        description="Online feature store: a tenant's transaction events in, per-account"
        " rolling aggregates out (per tenant), computed by the same code that builds the"
        " training set.",
        lifespan=lifespan,
        authenticate=True,
        verifier=verifier or remote_verifier,
    )
    app.include_router(router)
    return app
