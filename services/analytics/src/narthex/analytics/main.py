"""App factory of the analytics service: the store, the stream consumers, the drift loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from redis.asyncio import Redis

from narthex.analytics.consumer import StreamConsumer
from narthex.analytics.events import score_record, usage_record
from narthex.analytics.metrics import ConsumerMetrics, DriftMetrics
from narthex.analytics.routes import AnalyticsState, router
from narthex.analytics.service import AnalyticsService
from narthex.analytics.settings import AnalyticsSettings
from narthex.analytics.store import AnalyticsStore, migrate
from narthex.common.app import ServiceApp, VerifierFactory, service_app
from narthex.common.authn import remote_verifier
from narthex.common.background import every
from narthex.common.events import PREDICTION_STREAM, USAGE_STREAM, stream_name
from narthex.common.readiness import CheckResult


@asynccontextmanager
async def _running(consumers: list[StreamConsumer[Any]]) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(c.run(), name=f"consume:{c.stream}") for c in consumers]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def create_app(
    settings: AnalyticsSettings | None = None,
    *,
    verifier: VerifierFactory | None = None,
    background: bool = True,
) -> ServiceApp:
    """The lifespan yields an `AnalyticsState`. `verifier` checks callers' JWTs: the auth
    service's JWKS unless a test gives another. `background=False` starts no background
    loop (stream consumers, drift, forgetting old event ids): tests then call
    `state["service"].drift()` or a consumer's `handle`, `claim` and `trim` themselves."""
    settings = settings or AnalyticsSettings()

    @asynccontextmanager
    async def lifespan(app: ServiceApp) -> AsyncIterator[AnalyticsState]:
        async with AsyncExitStack() as stack:
            await migrate(settings.database_url)
            store = await stack.enter_async_context(
                await AnalyticsStore.open(settings.database_url)
            )
            registry = app.metrics_registry
            service = AnalyticsService(
                store,
                repository=settings.model_repository,
                drift_window_hours=settings.drift_window_hours,
                drift_threshold=settings.drift_threshold,
                drift_metrics=DriftMetrics(registry),
                max_range_days=settings.max_range_days,
            )
            readiness = app.readiness

            async def database() -> CheckResult:
                try:
                    await store.ping()
                except Exception as exc:  # any failure means not ready; the kind is logged
                    return CheckResult(False, {"error": type(exc).__name__})
                return CheckResult(True)

            readiness.add("database", database)
            consumers: list[StreamConsumer[Any]] = []
            if settings.redis_url:
                redis = Redis.from_url(
                    settings.redis_url, socket_timeout=5.0, socket_connect_timeout=1.0
                )
                stack.push_async_callback(redis.aclose)
                metrics = ConsumerMetrics(registry)
                options: dict[str, Any] = {
                    "metrics": metrics,
                    "batch": settings.consumer_batch,
                    "block_ms": settings.block_ms,
                    "claim_idle_seconds": settings.claim_idle_seconds,
                    "claim_interval_seconds": settings.claim_interval_seconds,
                    "trim_interval_seconds": settings.trim_interval_seconds,
                    "min_round_seconds": settings.min_round_seconds,
                }
                consumers = [
                    StreamConsumer(
                        redis,
                        stream_name(settings.stream_prefix, USAGE_STREAM),
                        settings.group,
                        decode=usage_record,
                        apply=store.apply_usage,
                        **options,
                    ),
                    StreamConsumer(
                        redis,
                        stream_name(settings.stream_prefix, PREDICTION_STREAM),
                        settings.group,
                        decode=score_record,
                        apply=store.apply_scores,
                        **options,
                    ),
                ]

                async def streams() -> CheckResult:
                    healthy = {c.stream: c.healthy for c in consumers}
                    return CheckResult(all(healthy.values()), healthy)

                # Reported, not required: the reports still answer while Redis is away.
                readiness.add("streams", streams, required=False)
                if background:
                    await stack.enter_async_context(_running(consumers))
            if background:
                await stack.enter_async_context(
                    every(settings.drift_interval_seconds, service.drift, name="drift")
                )
                await stack.enter_async_context(
                    every(
                        3600.0,
                        lambda: service.forget_old_ids(settings.dedup_retention_days),
                        name="forget-event-ids",
                    )
                )
            yield AnalyticsState(service=service, consumers=consumers)

    app = service_app(
        settings,
        title="narthex analytics",
        authenticate=True,
        verifier=verifier or remote_verifier,
        description="Usage and prediction aggregates, drift.",
        lifespan=lifespan,
    )
    app.include_router(router)
    return app
