"""App factory of the gateway: one ServiceClient per upstream, the route table, the proxy."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.middleware import Middleware
from starlette.types import Scope

from narthex.common.app import service_app
from narthex.common.http import ServiceClient
from narthex.common.readiness import CheckResult
from narthex.common.security import JwksCache, TokenVerifier
from narthex.gateway.identity import Identity
from narthex.gateway.proxy import ProxyMiddleware
from narthex.gateway.routing import RouteTable
from narthex.gateway.settings import GatewaySettings


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


def app_identity(scope: Scope) -> Identity:
    """The Identity the lifespan put on `app.state` (so tests can swap it)."""
    identity: Identity = scope["app"].state.identity
    return identity


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    clients: dict[str, ServiceClient] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            policy = settings.client_policy()
            for name, url in settings.upstream_urls().items():
                client = await stack.enter_async_context(ServiceClient(name, url, policy))
                clients[name] = client
                app.state.readiness.add(name, upstream_check(client))
            auth = clients["auth"]

            async def fetch_jwks() -> Mapping[str, Any]:
                response = await auth.get("/.well-known/jwks.json", deadline=3.0)
                response.raise_for_status()
                document: Mapping[str, Any] = response.json()
                return document

            verifier = TokenVerifier(
                JwksCache(fetch_jwks, unknown_kid_cooldown=settings.jwks_unknown_kid_cooldown),
                issuer=settings.jwt_issuer,
                audience=settings.jwt_audience,
            )
            app.state.identity = Identity(
                verifier, auth, revalidate_seconds=settings.api_key_revalidate_seconds
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
                max_body_bytes=settings.max_body_bytes,
            )
        ],
    )
    app.state.clients = clients
    return app
