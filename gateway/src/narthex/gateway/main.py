"""App factory of the gateway: one ServiceClient per upstream, the route table, the proxy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI
from starlette.middleware import Middleware

from narthex.common.app import service_app
from narthex.common.http import ServiceClient
from narthex.common.readiness import CheckResult
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
                max_body_bytes=settings.max_body_bytes,
            )
        ],
    )
    app.state.clients = clients
    return app
