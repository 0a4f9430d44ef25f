"""App factory of the inference service: the model registry in the lifespan, the routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import structlog
from starlette.middleware import Middleware

from narthex.common.app import ServiceApp, VerifierFactory, service_app
from narthex.common.authn import remote_verifier
from narthex.common.credential import ServiceCredential
from narthex.common.events import PREDICTION_STREAM, EventBuffer, event_buffers
from narthex.common.http import ClientPolicy, ServiceClient
from narthex.common.readiness import CheckResult
from narthex.inference.embeddings import EmbeddingsEndpoint
from narthex.inference.errors import install_error_handlers
from narthex.inference.features import FeatureClient, FeatureMetrics
from narthex.inference.metrics import InferenceMetrics
from narthex.inference.models import ModelRegistry
from narthex.inference.repository import Repository
from narthex.inference.routes import PUBLIC_PATHS, InferenceState, router
from narthex.inference.service import InferenceService
from narthex.inference.settings import InferenceSettings

log = structlog.get_logger("narthex.inference")


def _service_credential(settings: InferenceSettings) -> ServiceCredential | None:
    """Inference's own credential for features, fetching its first token already."""
    if settings.service_key is None:
        log.warning(
            "no NARTHEX_INFERENCE_SERVICE_KEY: transaction models score on the default features"
        )
        return None
    auth = ServiceClient("auth", str(settings.auth_url).rstrip("/"), ClientPolicy(deadline=5.0))
    credential = ServiceCredential(auth, settings.service_key)
    credential.refresh_soon()  # so that the first batch finds a token
    return credential


def create_app(
    settings: InferenceSettings | None = None, *, verifier: VerifierFactory | None = None
) -> ServiceApp:
    """The lifespan yields an `InferenceState`. `verifier` checks callers' JWTs: the auth
    service's JWKS unless a test gives another."""
    settings = settings or InferenceSettings()

    @asynccontextmanager
    async def lifespan(app: ServiceApp) -> AsyncIterator[InferenceState]:
        features_client = ServiceClient(
            "features", str(settings.features_url).rstrip("/"), settings.features_policy()
        )
        credential = _service_credential(settings)
        features = FeatureClient(
            features_client,
            credential,
            budget=settings.features_timeout,
            metrics=FeatureMetrics(app.metrics_registry),
        )
        events = AsyncExitStack()
        predictions: EventBuffer | None = None
        if settings.redis_url:
            buffers = await events.enter_async_context(
                event_buffers(
                    settings.redis_url,
                    settings.events_prefix,
                    (PREDICTION_STREAM,),
                    app.metrics_registry,
                    capacity=settings.events_buffer,
                )
            )
            predictions = buffers[PREDICTION_STREAM]
        registry = ModelRegistry(
            Repository(settings.model_repository),
            InferenceMetrics(app.metrics_registry),
            provider=settings.provider,
            intra_op_threads=settings.intra_op_threads,
            drain_timeout=settings.drain_timeout,
            features=features,
            predictions=predictions,
        )
        service = InferenceService(
            registry,
            request_timeout=settings.request_timeout,
            max_text_bytes=settings.max_text_bytes,
            refusal_hold=settings.refusal_hold,
        )

        async def models_warm() -> CheckResult:
            return CheckResult(
                registry.ready(),
                {name: registry.default_version(name) for name in registry.names()},
            )

        app.readiness.add("models", models_warm)
        try:
            await registry.load_all(settings.models)
            yield InferenceState(
                service=service, registry=registry, features=features, settings=settings
            )
        finally:
            await registry.close()
            await events.aclose()  # after the last batch: its events are written
            if credential is not None:
                await credential.aclose()
                await credential.auth.aclose()
            await features_client.aclose()

    app = service_app(
        settings,
        title="narthex inference",
        description="Model repository, dynamic batching and ONNX Runtime serving: the Open"
        " Inference Protocol v2, v1 predictions and OpenAI-compatible embeddings.",
        lifespan=lifespan,
        authenticate=True,
        verifier=verifier or remote_verifier,
        public_paths=PUBLIC_PATHS,
        # The hot route, answered before FastAPI's routing; the router keeps its declaration
        # (the API description, and the answer when the fast path is switched off).
        inner_middleware=[Middleware(EmbeddingsEndpoint)] if settings.embeddings_fast_path else [],
    )
    install_error_handlers(app)
    app.include_router(router)
    return app
