"""App factory of the auth service: store, signing keys, token verification, routes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from narthex.auth.database import migrate
from narthex.auth.routes import AuthState, router
from narthex.auth.service import AuthService
from narthex.auth.settings import AuthSettings
from narthex.auth.signing import SigningKeyRing
from narthex.auth.store import AuthStore
from narthex.common.app import ServiceApp, VerifierFactory, service_app
from narthex.common.jwks import JwksCache
from narthex.common.readiness import CheckResult
from narthex.common.tokens import TokenVerifier

PUBLIC_PATHS = frozenset({"/v1/auth/token", "/.well-known/jwks.json", "/internal/v1/revocations"})


def create_app(
    settings: AuthSettings | None = None,
    *,
    verifier: VerifierFactory | None = None,
    background: bool = True,
) -> ServiceApp:
    """Auth's lifespan yields an `AuthState`. `verifier` checks callers' JWTs: its own
    key ring unless a test gives another. `background=False` starts no background task
    (the last-used flush): tests flush themselves (`state["auth"].flush_last_used()`)."""
    settings = settings or AuthSettings()

    @asynccontextmanager
    async def lifespan(app: ServiceApp) -> AsyncIterator[AuthState]:
        await migrate(settings.database_url)
        # Dev generates its keys on first start; elsewhere they must be provided.
        keyring = SigningKeyRing(settings.signing_keys_dir, generate=settings.env == "dev")
        store = await AuthStore.open(settings.database_url)
        service = AuthService(store, keyring, settings)

        async def own_keys() -> dict[str, Any]:
            return keyring.jwks()

        # The auth service checks the tokens it issued like any other service does,
        # but reads its own key ring instead of fetching its JWKS over HTTP.
        own_verifier = TokenVerifier(
            JwksCache(own_keys, refresh_interval=5.0, unknown_kid_cooldown=1.0),
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
        )

        async def database() -> CheckResult:
            await store.ping()
            return CheckResult(True)

        app.readiness.add("database", database)
        flusher = asyncio.create_task(service.flush_last_used_forever()) if background else None
        try:
            # A given verifier is put in the state by service_app, over this one.
            yield AuthState(auth=service, verifier=own_verifier)
        finally:
            if flusher is not None:
                flusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flusher
            await service.flush_last_used()
            await store.close()

    app = service_app(
        settings,
        title="narthex auth",
        description="Tenants, plans, API keys, JWT issuing and JWKS.",
        lifespan=lifespan,
        authenticate=True,
        verifier=verifier,
        public_paths=PUBLIC_PATHS,
    )
    app.include_router(router)
    return app
