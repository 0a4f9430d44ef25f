"""Forwarding a public request to its upstream: headers, body cap, failure mapping."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple
from urllib.parse import quote, quote_from_bytes

from starlette.types import ASGIApp, Receive, Scope, Send

from narthex.common.authn import check_access
from narthex.common.body import read_body
from narthex.common.errors import (
    BadGateway,
    GatewayTimeout,
    Problem,
    ServiceUnavailable,
    render_problem,
)
from narthex.common.http import ServiceClient
from narthex.common.middleware import ROUTE_SCOPE_KEY
from narthex.common.security import Principal
from narthex.common.transport import Exchange
from narthex.gateway.catalog import MODEL_LIST, check_model, visible_models
from narthex.gateway.clientip import Network, forwarded_chain
from narthex.gateway.cost import Counted, count, forwarded_headers
from narthex.gateway.guard import ClientGuard
from narthex.gateway.identity import Identity, KeyInQuery, credentials_in_query
from narthex.gateway.plans import PlanBook, TenantPlan
from narthex.gateway.ratelimit import (
    EdgeLimiter,
    TooManyItems,
    rate_limit_headers,
    refusal,
)
from narthex.gateway.routing import Route, RouteTable

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Set by this hop for the upstream, never passed on from the client: ids and trace
# context are re-issued, the deadline is what is left of ours, and upstreams answer
# uncompressed so the body we relay is exactly the one we read.
# Replaced by the caller's verified JWT: API keys never go past the gateway, except to
# the token exchange itself.
CREDENTIAL_HEADERS = frozenset({b"authorization", b"x-api-key"})
REQUEST_DROP = (
    HOP_BY_HOP
    | CREDENTIAL_HEADERS
    | {
        b"host",
        b"content-length",
        b"x-request-id",
        b"traceparent",
        b"tracestate",
        b"x-request-timeout-ms",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"accept-encoding",
        b"expect",  # 100-continue is negotiated with the client by this hop's server
    }
)
# The upstream's framing and identity stay behind; this hop sets its own.
RESPONSE_DROP = HOP_BY_HOP | {
    b"content-length",
    b"content-encoding",
    b"x-request-id",
    b"server",
    b"date",
}


# What a path may carry unescaped (RFC 3986 pchar, "/"; "%" of the client's own escapes):
# a space, CR, LF or a non-ASCII byte would change or split the upstream request line.
_PATH_SAFE = "/%!$&'()*+,;=:@-._~"


class _Admitted(NamedTuple):
    """A limited request, charged: what goes upstream, and the plan and limits it ran under."""

    body: bytes
    headers: list[tuple[bytes, bytes]]
    plan: TenantPlan
    limit_headers: list[tuple[bytes, bytes]]


class MethodNotAllowed(Problem):
    status, type_slug, title = 405, "method-not-allowed", "Method not allowed"


def upstream_headers(scope: Scope, trusted: Sequence[Network] = ()) -> list[tuple[bytes, bytes]]:
    raw: list[tuple[bytes, bytes]] = scope["headers"]
    drop = REQUEST_DROP
    for name, value in raw:
        if name == b"connection":  # the client may name more hop-by-hop headers
            drop = drop | {token.strip().lower() for token in value.split(b",")}
    headers = [(name, value) for name, value in raw if name not in drop]
    # The chain as far as it can be believed, the resolved client first: a trusted
    # proxy's chain with the peer appended, otherwise just the peer.
    if scope.get("client"):
        chain = forwarded_chain(scope, trusted)
        headers.append((b"x-forwarded-for", ", ".join(chain).encode()))
    headers.append((b"x-forwarded-proto", scope.get("scheme", "http").encode()))
    return headers


def upstream_path(scope: Scope) -> str:
    """The path as the client escaped it (`raw_path`), never the decoded `path`: decoding
    turns `%2F`, `%3F`, `%20` or `%0D%0A` into a separator, a query or a new header line."""
    raw: bytes | None = scope.get("raw_path")
    if raw is None:
        return quote(scope["path"], safe=_PATH_SAFE.replace("%", ""))
    return quote_from_bytes(raw, safe=_PATH_SAFE)


def _without_hop_by_hop(
    headers: list[tuple[bytes, bytes]], drop: frozenset[bytes]
) -> list[tuple[bytes, bytes]]:
    """`headers` less `drop` and whatever a `Connection` header names (RFC 9110 7.6.1)."""
    for name, value in headers:
        if name.lower() == b"connection":
            drop = drop | {token.strip().lower() for token in value.split(b",")}
    return [(name, value) for name, value in headers if name.lower() not in drop]


def _retry_after(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    for name, value in headers:
        if name.lower() == b"retry-after" and value.isdigit():
            return {"Retry-After": value.decode()}
    return {"Retry-After": "1"}


def check_upstream_status(response: Exchange) -> None:
    """An upstream's 5xx becomes the gateway's own problem; its body never leaks."""
    status = response.status_code
    if status < 500:
        return
    if status == 503:
        raise ServiceUnavailable(headers=_retry_after(response.headers))
    if status == 504:
        raise GatewayTimeout()
    raise BadGateway()


class ProxyMiddleware:
    """Forwards what the route table names; everything else goes on to the gateway's app.

    A middleware rather than a route: proxied requests skip the router, the dependency
    machinery and the exception middleware, which is most of a FastAPI request's cost.
    So it renders its own problems.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        table: RouteTable,
        clients: Mapping[str, ServiceClient],
        identity: Callable[[Scope], Identity],
        limits: Callable[[Scope], tuple[PlanBook, EdgeLimiter]],
        max_body_bytes: int,
        guard: ClientGuard,
        max_decoded_bytes: int | None = None,
    ) -> None:
        self.app = app
        self.table = table
        self.clients = clients
        self.identity = identity
        self.limits = limits
        self.max_body_bytes = max_body_bytes
        self.max_decoded_bytes = max_body_bytes if max_decoded_bytes is None else max_decoded_bytes
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.table.match(scope["path"]) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        scope[ROUTE_SCOPE_KEY] = route.prefix
        try:
            await self._forward(route, scope, receive, send)
        except Problem as problem:
            await render_problem(problem, instance=scope["path"])(scope, receive, send)

    async def _admit(
        self,
        scope: Scope,
        route: Route,
        principal: Principal,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> _Admitted:
        """Count the request's items in the form it is forwarded in (narthex.gateway.cost)
        and charge them to its tenant, or refuse it; the headers say where it stands."""
        counted = (
            await count(
                scope["headers"],
                body,
                route.cost_field,
                binary_tensors=route.binary_tensors,
                limit=self.max_decoded_bytes,
            )
            if body and route.cost_field is not None
            else Counted(body, 1)
        )
        plans, limiter = self.limits(scope)
        plan = await plans.plan_of(principal)
        check_model(route, scope["path"], counted.document, plan)
        cost = counted.cost
        if cost > plan.max_items_per_request:
            raise TooManyItems(
                f"the request carries {cost} items; the {plan.plan} plan allows"
                f" {plan.max_items_per_request} per request"
            )
        decision = await limiter.acquire(plan, cost)
        if not decision.allowed:
            raise refusal(decision, cost)
        # The parsed document stays here: it is garbage before the upstream is called.
        return _Admitted(
            counted.body, forwarded_headers(headers, counted), plan, rate_limit_headers(decision)
        )

    async def _forward(self, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        if route.methods is not None and method not in route.methods:
            raise MethodNotAllowed(headers={"Allow": ", ".join(sorted(route.methods))})
        if route.guarded:
            await self.guard.check(scope, route.prefix)
        headers = upstream_headers(scope, self.guard.trusted)
        if route.forward_credentials:
            headers.extend(
                (name, value) for name, value in scope["headers"] if name in CREDENTIAL_HEADERS
            )
        query: bytes = scope["query_string"]
        principal = None
        if route.public:
            # Identity refuses keys in the query of the other routes; here (the token
            # endpoint above all) the URL, key included, would go on to the upstream
            # and into every access log on the way.
            if query and credentials_in_query(query):
                raise KeyInQuery()
        else:
            principal = await self.identity(scope).authenticate(scope)
            check_access(principal, role=route.role, scope=route.scope)
            scope.setdefault("state", {})["tenant"] = principal.tenant
            headers.append((b"authorization", b"Bearer " + principal.token.encode()))
        body = await read_body(scope, receive, self.max_body_bytes)
        limit_headers: list[tuple[bytes, bytes]] = []
        plan = None
        if route.limited and principal is not None:
            body, headers, plan, limit_headers = await self._admit(
                scope, route, principal, headers, body
            )
        target = route.rewrite or upstream_path(scope)
        if query:
            target += "?" + query.decode("latin-1")
        response = await self.clients[route.upstream].forward(method, target, headers, body)
        check_upstream_status(response)
        content = response.content
        if (
            plan is not None
            and plan.allowed_models  # most plans allow every model: nothing to filter
            and scope["path"] == MODEL_LIST
            and method == "GET"
            and response.status_code == 200
        ):
            content = visible_models(content, plan)
        headers = _without_hop_by_hop(response.headers, RESPONSE_DROP)
        headers.append((b"content-length", b"%d" % len(content)))
        headers.extend(limit_headers)
        start = {"type": "http.response.start", "status": response.status_code, "headers": headers}
        await send(start)
        await send({"type": "http.response.body", "body": content})
