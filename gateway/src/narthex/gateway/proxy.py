"""Forwarding a public request to its upstream: headers, body cap, failure mapping."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import NamedTuple
from urllib.parse import quote, quote_from_bytes, urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from narthex.common.authn import check_access
from narthex.common.body import read_body
from narthex.common.context import random_id
from narthex.common.errors import (
    BadGateway,
    GatewayTimeout,
    Problem,
    ServiceUnavailable,
    send_error,
)
from narthex.common.http import ServiceClient, is_backpressure
from narthex.common.middleware import ROUTE_SCOPE_KEY
from narthex.common.plans import TenantLimits
from narthex.common.tokens import Principal
from narthex.common.transport import Exchange
from narthex.gateway.catalog import MODEL_LIST, check_model, visible_models
from narthex.gateway.clientip import Network, forwarded_chain
from narthex.gateway.cost import Counted, count, forwarded_headers
from narthex.gateway.errors import KeyInQuery, MethodNotAllowed, TooManyItems
from narthex.gateway.identity import credentials_in_query
from narthex.gateway.inflight import TenantInFlight
from narthex.gateway.public import PublicAnswers
from narthex.gateway.ratelimit.edge import (
    rate_limit_headers,
    refusal,
)
from narthex.gateway.ratelimit.guard import ClientGuard
from narthex.gateway.resources import GatewayState
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
# Bytes a query cannot carry on a request line (controls, space): escaped. Everything
# else, non-ASCII bytes included, goes on exactly as the client sent it.
_QUERY_UNSAFE = re.compile(rb"[\x00-\x20\x7f]")
# Where the scope records the tenant whose in-flight count this request holds.
_IN_FLIGHT_KEY = "narthex.in_flight"
# What the usage event of a request needs, gathered on its way through (scope keys).
_PRINCIPAL_KEY = "narthex.principal"
_CHARGED_KEY = "narthex.charged"
_LIMITED_KEY = "narthex.limited"
_MODEL_KEY = "narthex.model"
_STATUS_KEY = "narthex.status"
# The model version that answered, as inference names it on its answers.
MODEL_VERSION_HEADER = b"x-narthex-model-version"
_VERSIONS = "/versions/"
# Response headers that may hold an upstream's own URL.
_URL_HEADERS = frozenset({b"location", b"content-location"})


class _Admitted(NamedTuple):
    """A limited request, charged: what goes upstream, and the plan and limits it ran under."""

    body: bytes
    headers: list[tuple[bytes, bytes]]
    plan: TenantLimits
    limit_headers: list[tuple[bytes, bytes]]


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


def upstream_query(query: bytes) -> str:
    """The raw query string byte for byte (as latin-1 text, one character per byte, which
    the transport writes back as the same bytes); only what would break the request line
    is escaped."""
    if _QUERY_UNSAFE.search(query):
        query = _QUERY_UNSAFE.sub(lambda m: b"%%%02X" % m[0][0], query)
    return query.decode("latin-1")


def public_location(value: bytes, upstream: ServiceClient) -> bytes | None:
    """An upstream's `Location` as the client may see it, or None to drop it.

    A relative reference carries no address and passes as it is. An absolute URL at the
    upstream's own origin (its internal host and port) becomes the same path at the
    gateway, which serves the upstream's paths as they are; any other absolute URL
    could be anything internal, so it is dropped.
    """
    text = value.decode("latin-1").strip()
    if not text.startswith("//") and "://" not in text.split("?", 1)[0]:
        return value  # path-absolute or relative: no scheme, no host
    try:
        parts = urlsplit(text)
        origin = upstream.base_url
        same = (
            parts.scheme.lower() in ("", origin.scheme)
            and (parts.hostname or "").lower() == origin.host.lower()
            and (parts.port or 80) == (origin.port or 80)
        )
    except ValueError:
        return None
    base = upstream.base_path
    path = parts.path or "/"
    if not same or not (path == base or path.startswith(base + "/")):
        return None
    public = path[len(base) :] or "/"
    if parts.query:
        public += "?" + parts.query
    return public.encode("latin-1")


def response_headers(response: Exchange, upstream: ServiceClient) -> list[tuple[bytes, bytes]]:
    """The upstream's end-to-end headers for the client: hop-by-hop ones (and whatever its
    `Connection` header names, RFC 9110 7.6.1) and this hop's own stay behind, and no
    header names an internal address."""
    drop = RESPONSE_DROP
    urls = False
    for name, value in response.headers:
        lowered = name.lower()
        if lowered == b"connection":
            drop = drop | {token.strip().lower() for token in value.split(b",")}
        elif lowered in _URL_HEADERS:
            urls = True
    headers = [(name, value) for name, value in response.headers if name.lower() not in drop]
    if not urls:
        return headers
    public = []
    for name, value in headers:
        if name.lower() in _URL_HEADERS:
            rewritten = public_location(value, upstream)
            if rewritten is None:
                continue
            value = rewritten
        public.append((name, value))
    return public


def check_upstream_status(response: Exchange) -> None:
    """An upstream's 5xx becomes the gateway's own problem; its body never leaks.

    Backpressure (429, 503 with Retry-After) is the exception: an answer our own
    upstream shapes for clients (slow down, come back then), relayed as it was sent.
    """
    status = response.status_code
    if status < 500 or is_backpressure(response):
        return
    if status == 503:
        raise ServiceUnavailable(headers={"Retry-After": "1"})
    if status == 504:
        raise GatewayTimeout()
    raise BadGateway()


def model_of(
    path: str, route: Route, response: Exchange, named: tuple[str, str] | None
) -> tuple[str, str]:
    """The model a request reached and the version that answered (the upstream's header),
    else the one its path or body pinned; "" where unknown."""
    model, version = named or ("", "")
    if route.model_path is not None and path.startswith(route.model_path):
        rest = path[len(route.model_path) :]
        model = rest.partition("/")[0][:128]
        if _VERSIONS in rest:
            version = rest.split(_VERSIONS, 1)[1].partition("/")[0][:32]
    for name, value in response.headers:
        if name.lower() == MODEL_VERSION_HEADER:
            version = value.decode("latin-1")[:32]
            break
    return model, version


class ProxyMiddleware:
    """Forwards what the route table names; everything else goes on to the gateway's app.

    A middleware rather than a route: proxied requests skip the router, the dependency
    machinery and the exception middleware, which is most of a FastAPI request's cost.
    So it renders its own problems. What the lifespan opened (upstream clients, identity,
    plans, limiter, usage events) it reads from the request's `scope["state"]`.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        table: RouteTable,
        max_body_bytes: int,
        guard: ClientGuard,
        public: PublicAnswers,
        in_flight: TenantInFlight,
        max_decoded_bytes: int | None = None,
    ) -> None:
        self.app = app
        self.table = table
        self.max_body_bytes = max_body_bytes
        self.max_decoded_bytes = max_body_bytes if max_decoded_bytes is None else max_decoded_bytes
        self.guard = guard
        self.public = public
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.table.match(scope["path"]) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        scope[ROUTE_SCOPE_KEY] = route.prefix
        try:
            await self._forward(route, scope, receive, send)
        except Problem as problem:
            scope[_STATUS_KEY] = problem.status
            await send_error(problem, scope, receive, send)
        finally:
            self._release(scope)
            if _PRINCIPAL_KEY in scope:
                self._usage_event(scope, route, started)

    def _usage_event(self, scope: Scope, route: Route, started: float) -> None:
        """One usage event for an authenticated request, queued (never awaited): who, what
        it was charged, how it ended. A request that ended in an exception of ours is a
        500 (the outer middleware answers it so)."""
        state: GatewayState = scope["state"]
        events = state["usage_events"]
        if events is None:
            return
        principal: Principal = scope[_PRINCIPAL_KEY]
        tenant = principal.tenant
        model, version = scope.get(_MODEL_KEY) or ("", "")
        events.emit(
            {
                "id": random_id(),  # 128 random bits; uuid4 costs 5x more
                "t": time.time(),
                "tenant": tenant,
                "key": principal.key_id or "",
                "route": route.prefix,
                "model": model,
                "version": version,
                "items": scope.get(_CHARGED_KEY, 0),
                "status": scope.get(_STATUS_KEY, 500),
                "ms": round((time.perf_counter() - started) * 1000.0, 3),
                "limited": scope.get(_LIMITED_KEY, False),
            },
            tenant=tenant,  # the buffer is fair across tenants when an outage fills it
        )

    def _release(self, scope: Scope) -> None:
        tenant = scope.pop(_IN_FLIGHT_KEY, None)
        if tenant is not None:
            self.in_flight.release(tenant)

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
        state: GatewayState = scope["state"]
        plan = await state["plans"].plan_of(principal)
        check_model(route, scope["path"], counted.document, plan)
        cost = counted.cost
        if cost > plan.max_items_per_request:
            raise TooManyItems(
                f"the request carries {cost} items; the {plan.plan} plan allows"
                f" {plan.max_items_per_request} per request"
            )
        decision = await state["limiter"].acquire(plan, cost)
        if not decision.allowed:
            scope[_LIMITED_KEY] = True
            raise refusal(decision, cost)
        scope[_CHARGED_KEY] = cost
        if route.model_field is not None:
            document = counted.document
            named = document.get(route.model_field) if type(document) is dict else None
            if isinstance(named, str):
                name, _, version = named.partition(":")
                scope[_MODEL_KEY] = (name[:128], version[:32])
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
        state: GatewayState = scope["state"]
        principal = None
        if route.public:
            # Identity refuses keys in the query of the other routes; here (the token
            # endpoint above all) the URL, key included, would go on to the upstream
            # and into every access log on the way.
            if query and credentials_in_query(query):
                raise KeyInQuery()
        else:
            principal = await state["identity"].authenticate(scope)
            scope[_PRINCIPAL_KEY] = principal
            check_access(principal, role=route.role, scope=route.scope)
            scope["state"]["tenant"] = principal.tenant  # for the access log
            if not self.in_flight.try_acquire(principal.tenant):
                await self.in_flight.wait_for_slot(principal.tenant)
            scope[_IN_FLIGHT_KEY] = principal.tenant  # released once the upstream answers
            headers.append((b"authorization", b"Bearer " + principal.token.encode()))
        body = await read_body(scope, receive, self.max_body_bytes)
        limit_headers: list[tuple[bytes, bytes]] = []
        plan = None
        if route.limited and principal is not None:
            body, headers, plan, limit_headers = await self._admit(
                scope, route, principal, headers, body
            )
        client = state["clients"][route.upstream]
        if route.cached:
            # The same answer for everyone: never shaped by this caller's path, query or
            # headers, and fetched once per cache period whatever the traffic.
            response = await self.public.get(
                route.prefix, lambda: client.forward("GET", route.prefix, [], b"")
            )
        else:
            target = upstream_path(scope)
            if query:
                target += "?" + upstream_query(query)
            response = await client.forward(method, target, headers, body)
        # Its connection is back in the pool: the tenant's next request, which may come
        # the moment this answer arrives, must find the slot free.
        self._release(scope)
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
        headers = response_headers(response, client)
        if route.model_path is not None or route.model_field is not None:
            scope[_MODEL_KEY] = model_of(scope["path"], route, response, scope.get(_MODEL_KEY))
        headers.append((b"content-length", b"%d" % len(content)))
        headers.extend(limit_headers)
        scope[_STATUS_KEY] = response.status_code
        start = {"type": "http.response.start", "status": response.status_code, "headers": headers}
        await send(start)
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else content})
