"""Service app factory: the lifespan, middleware, error handlers and probes every service has."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry
from starlette.middleware import Middleware

from narthex.common.authn import OPEN_PATHS, VERIFIER, RequireTokenMiddleware
from narthex.common.body import BodyLimitMiddleware
from narthex.common.errors import install_error_handlers
from narthex.common.metrics import (
    CONTENT_TYPE_LATEST,
    HttpMetrics,
    generate_latest,
    new_registry,
)
from narthex.common.middleware import RequestContextMiddleware
from narthex.common.openapi import document_errors
from narthex.common.readiness import CheckResult, Readiness
from narthex.common.settings import ServiceSettings
from narthex.common.telemetry import TracingMiddleware, setup_tracing
from narthex.common.tokens import TokenVerifier

# What a lifespan yields: the server puts it in every request's `scope["state"]` (a
# shallow copy per request). Each service declares its own as a TypedDict.
LifespanState = Mapping[str, Any]
VerifierFactory = Callable[[Any], AbstractAsyncContextManager[TokenVerifier]]


class ServiceApp(FastAPI):
    """A service's app, with what every service builds before start-up, typed: its
    settings, its readiness checks and its metrics registry (lifespans add to both)."""

    settings: ServiceSettings
    readiness: Readiness
    metrics_registry: CollectorRegistry


Lifespan = Callable[[ServiceApp], AbstractAsyncContextManager[LifespanState]]


@asynccontextmanager
async def _no_resources(app: ServiceApp) -> AsyncIterator[LifespanState]:
    yield {}


def service_app(
    settings: ServiceSettings,
    *,
    title: str,
    description: str,
    version: str = "0.1.0",
    lifespan: Lifespan = _no_resources,
    middleware: Sequence[Middleware] = (),
    inner_middleware: Sequence[Middleware] = (),
    authenticate: bool = False,
    verifier: VerifierFactory | None = None,
    public_paths: frozenset[str] = frozenset(),
) -> ServiceApp:
    """A FastAPI app with narthex's common behaviour; the service adds its routes.

    `lifespan` opens the service's resources and yields them (a TypedDict of the
    service's), which each request finds in `scope["state"]`; it runs inside the common
    one, and the app is ready only once it has finished starting. `middleware` runs inside the
    common request context and span, before routing (the gateway's proxy lives there);
    request bodies are read (`BodyLimitMiddleware`, the settings' caps) just before routing.
    `inner_middleware` runs innermost, after the token check and the body cap, just before
    FastAPI's exception handlers and router: a hot route answered as pure ASGI lives there
    (inference's embeddings), finding the caller's Principal and the body already read.

    `authenticate` makes every route but the probes and `public_paths` require a
    verified JWT (zero trust: internal services check the caller themselves). The
    verifier comes from `verifier(settings)`, opened around the service's lifespan, or
    is the one the service's lifespan yields under `VERIFIER` (auth's own key ring).
    """
    readiness = Readiness()
    registry = new_registry()
    started = {"value": False}

    async def lifespan_started() -> CheckResult:
        return CheckResult(started["value"])

    @asynccontextmanager
    async def common_lifespan(_: FastAPI) -> AsyncIterator[LifespanState]:
        async with AsyncExitStack() as stack:
            checker = None
            if verifier is not None:
                checker = await stack.enter_async_context(verifier(settings))
            state = await stack.enter_async_context(lifespan(app))
            if checker is not None:
                state = {**state, VERIFIER: checker}
            started["value"] = True
            try:
                yield state
            finally:
                started["value"] = False

    app = ServiceApp(
        title=title,
        description=description,
        version=version,
        lifespan=common_lifespan,
        # The API's description is for developers: in production it would map the
        # attack surface for anyone who asks.
        openapi_url="/openapi.json" if settings.env == "dev" else None,
        docs_url="/docs" if settings.env == "dev" else None,
        redoc_url="/redoc" if settings.env == "dev" else None,
        # FastAPI's built-in telemetry would add a second server span per request on
        # top of TracingMiddleware (and cost more): see narthex.common.telemetry.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.settings = settings
    app.readiness = readiness
    app.metrics_registry = registry
    readiness.add("lifespan", lifespan_started)

    install_error_handlers(app)

    def openapi() -> dict[str, Any]:
        # Built once, on first request, when every route is there.
        if not app.openapi_schema:
            app.openapi_schema = document_errors(
                FastAPI.openapi(app),
                authenticated=authenticate,
                open_paths=OPEN_PATHS | public_paths,
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override
    # add_middleware puts each one outside the ones before it: innermost first.
    for innermost in reversed(inner_middleware):
        app.add_middleware(innermost.cls, *innermost.args, **innermost.kwargs)
    # Bodies are read once the caller is known, within the size every service caps.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    if authenticate:
        app.add_middleware(RequireTokenMiddleware, public_paths=public_paths)
    for inner in reversed(middleware):
        app.add_middleware(inner.cls, *inner.args, **inner.kwargs)
    app.add_middleware(
        RequestContextMiddleware,
        metrics=HttpMetrics(registry, settings.service_name),
        access_log_sample_rate=settings.access_log_sample_rate,
        deadline_floor_ms=settings.deadline_floor_ms,
    )
    if settings.tracing:
        app.add_middleware(TracingMiddleware, provider=setup_tracing(settings.service_name))

    @app.get("/healthz", tags=["probes"], summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["probes"], summary="Readiness, per dependency")
    async def readyz() -> JSONResponse:
        ready, report = await readiness.report()
        return JSONResponse(report, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["probes"], summary="Prometheus metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
