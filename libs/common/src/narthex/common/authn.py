"""Zero trust inside: every call to an internal service carries a JWT, verified before routing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from narthex.common import scopes
from narthex.common.errors import Forbidden, Problem, Unauthorized, send_error
from narthex.common.http import ClientPolicy, ServiceClient
from narthex.common.jwks import JwksCache, JwksUnavailable
from narthex.common.settings import AuthClientSettings
from narthex.common.tokens import Principal, TokenVerifier

# Probes, scrapes and the API description stay open: they carry no tenant data.
OPEN_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)
BEARER = "bearer "
# Where an authenticated service's lifespan state holds the TokenVerifier that checks callers.
VERIFIER = "verifier"


class MissingToken(Unauthorized):
    type_slug, title = "unauthorized", "Authentication required"

    def __init__(self) -> None:
        super().__init__(
            "send a token as `Authorization: Bearer <jwt>`",
            headers={"WWW-Authenticate": 'Bearer realm="narthex"'},
        )


def bearer_token(scope: Scope) -> str | None:
    """The token of an `Authorization: Bearer ...` header, if there is exactly one."""
    found = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            if found is not None:
                return None  # two Authorization headers: ambiguous, believe neither
            text = value.decode("latin-1")
            if text[: len(BEARER)].lower() != BEARER:
                return None
            found = text[len(BEARER) :].strip()
    return found or None


class RequireTokenMiddleware:
    """Verifies the caller's JWT on every path but the open ones, with the verifier in the
    lifespan's state (`VERIFIER`); puts the Principal in `request.state.principal` (and the
    tenant in the access log)."""

    def __init__(self, app: ASGIApp, *, public_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.open_paths = OPEN_PATHS | public_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        try:
            token = bearer_token(scope)
            if token is None:
                raise MissingToken()
            state = scope["state"]
            verifier: TokenVerifier = state[VERIFIER]
            principal = await verifier.verify(token)
        except (Problem, JwksUnavailable) as problem:
            await send_error(problem, scope, receive, send)
            return
        state["principal"] = principal
        state["tenant"] = principal.tenant
        await self.app(scope, receive, send)


def verifier_for(auth: ServiceClient, settings: AuthClientSettings) -> TokenVerifier:
    """A TokenVerifier whose keys come from the auth service's JWKS (through `auth`), cached."""

    async def fetch() -> Mapping[str, Any]:
        response = await auth.get("/.well-known/jwks.json", deadline=3.0)
        response.raise_for_status()
        document: Mapping[str, Any] = response.json()
        return document

    jwks = JwksCache(fetch, unknown_kid_cooldown=settings.jwks_unknown_kid_cooldown)
    return TokenVerifier(jwks, issuer=settings.jwt_issuer, audience=settings.jwt_audience)


@asynccontextmanager
async def remote_verifier(settings: AuthClientSettings) -> AsyncIterator[TokenVerifier]:
    """`verifier_for` over a client of its own, for services that have no other use for one."""
    policy = ClientPolicy(try_timeout=2.0, deadline=3.0)
    async with ServiceClient("auth", str(settings.auth_url), policy) as client:
        yield verifier_for(client, settings)


# Dependencies are `async def` although they never await: FastAPI runs a plain `def`
# dependency in a worker thread, a thread hop per request for a dictionary lookup.
async def _principal(request: Request) -> Principal:
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None:  # a route outside RequireTokenMiddleware's reach
        raise MissingToken()
    return principal


CurrentPrincipal = Annotated[Principal, Depends(_principal)]


def check_access(principal: Principal, *, role: str | None, scope: str | None) -> None:
    """403 unless the caller holds `role` and its token carries `scope` (None: no demand)."""
    if role is not None and not principal.has_role(role):
        raise Forbidden(f"requires the {role} role")
    if scope is not None and not principal.has_scope(scope):
        raise Forbidden(f"requires the {scope} scope")


def require_role(role: str) -> Any:
    """A dependency: the caller's Principal, which must hold `role` (403 otherwise)."""

    async def check(principal: CurrentPrincipal) -> Principal:
        check_access(principal, role=role, scope=None)
        return principal

    return Depends(check)


def require_admin() -> Any:
    """A dependency: the caller's Principal, which must hold the `admin` role and carry the
    `admin` scope (a token narrowed to other scopes is not an admin token)."""

    async def check(principal: CurrentPrincipal) -> Principal:
        check_access(principal, role=scopes.ADMIN, scope=scopes.ADMIN_SCOPE)
        return principal

    return Depends(check)


def require_scope(scope: str) -> Any:
    """A dependency: the caller's Principal, whose token must carry `scope` (403 otherwise)."""

    async def check(principal: CurrentPrincipal) -> Principal:
        check_access(principal, role=None, scope=scope)
        return principal

    return Depends(check)
