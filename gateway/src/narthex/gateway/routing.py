"""The gateway's route table: which public path goes to which upstream. Data, in one place."""

from __future__ import annotations

from dataclasses import dataclass

from narthex.common import scopes

UPSTREAMS = ("auth", "features", "inference", "analytics")
# The token exchange: public, guarded per client IP. The gateway's own exchanges of API
# keys presented on other routes count against the same guard (see identity.py).
TOKEN_EXCHANGE = "/v1/auth/token"  # noqa: S105 - a path, not a password


@dataclass(frozen=True)
class Route:
    """`prefix` matches the path itself or anything below it (`/v2` matches `/v2/models`)."""

    prefix: str
    upstream: str
    methods: frozenset[str] | None = None
    # Who may call it: anyone (public), or a verified caller holding the scope / role.
    public: bool = False
    scope: str | None = None
    role: str | None = None
    # Pass the caller's own credentials through (only the token exchange needs them).
    forward_credentials: bool = False
    # Counted against the tenant's rate limit and daily quota; the cost of a request is
    # the length of the list at `cost_field` in its JSON body (1 without one), or with
    # `binary_tensors` (the Open Inference Protocol, whose JSON header may be followed by
    # raw tensors) the batch dimension of its inputs (narthex.gateway.cost).
    limited: bool = False
    cost_field: str | None = None
    binary_tensors: bool = False
    # Where a request names its model, checked against the plan's allowed models: the
    # path segment after `model_path`, or the JSON body's `model_field` ("name:version").
    model_path: str | None = None
    model_field: str | None = None
    # Unauthenticated yet worth abusing (guessing keys): counted per client IP instead.
    guarded: bool = False
    # Public and the same for every caller: answered from the last good answer, fetched
    # at most once per cache period, so no request makes an upstream call of its own.
    cached: bool = False

    def matches(self, path: str) -> bool:
        return path == self.prefix or (
            path.startswith(self.prefix) and path[len(self.prefix)] == "/"
        )


GET = frozenset({"GET", "HEAD"})

ROUTES: tuple[Route, ...] = (
    # auth: token exchange and signing keys (public), a tenant's own keys, administration
    Route(
        TOKEN_EXCHANGE,
        "auth",
        methods=frozenset({"POST"}),
        public=True,
        forward_credentials=True,
        guarded=True,
    ),
    Route("/.well-known/jwks.json", "auth", methods=GET, public=True, cached=True),
    Route("/v1/keys", "auth", scope=scopes.KEYS, limited=True),
    # Administration needs the admin role and a token that carries the admin scope: a
    # token the token endpoint narrowed to other scopes is not an admin token.
    Route("/v1/admin/tenants", "auth", role=scopes.ADMIN, scope=scopes.ADMIN_SCOPE),
    Route("/v1/admin/plans", "auth", role=scopes.ADMIN, scope=scopes.ADMIN_SCOPE),
    Route("/v1/admin/keys", "auth", role=scopes.ADMIN, scope=scopes.ADMIN_SCOPE),
    Route("/v1/admin/signing-keys", "auth", role=scopes.ADMIN, scope=scopes.ADMIN_SCOPE),
    Route("/v1/admin/audit", "auth", role=scopes.ADMIN, scope=scopes.ADMIN_SCOPE),
    # inference: predictions, embeddings, the Open Inference Protocol, model admin
    Route(
        "/v1/models",
        "inference",
        scope=scopes.INFERENCE,
        limited=True,
        cost_field="instances",
        model_path="/v1/models/",
    ),
    Route(
        "/v1/embeddings",
        "inference",
        scope=scopes.INFERENCE,
        limited=True,
        cost_field="input",
        model_field="model",
    ),
    Route(
        "/v2",
        "inference",
        scope=scopes.INFERENCE,
        limited=True,
        cost_field="inputs",
        binary_tensors=True,
        model_path="/v2/models/",
    ),
    Route("/v1/admin/models", "inference", role=scopes.ADMIN, scope=scopes.ADMIN_SCOPE),
    # features: event ingestion
    Route("/v1/events", "features", scope=scopes.EVENTS, limited=True, cost_field="events"),
    # analytics: usage and drift
    # Reading one's own usage is not usage: never charged, never counted against a quota.
    Route("/v1/usage", "analytics", methods=GET, scope=scopes.USAGE),
    Route("/v1/admin/usage", "analytics", role=scopes.ADMIN, scope=scopes.ADMIN_SCOPE),
    Route("/v1/admin/drift", "analytics", role=scopes.ADMIN, scope=scopes.ADMIN_SCOPE),
    # Each upstream's status (`/v1/status/{upstream}`) is the gateway's own route: it
    # answers from the background probes, never with a call per request.
)


class RouteTable:
    def __init__(self, routes: tuple[Route, ...] = ROUTES) -> None:
        unknown = {r.upstream for r in routes} - set(UPSTREAMS)
        if unknown:
            raise ValueError(f"routes name unknown upstreams: {sorted(unknown)}")
        # Longest prefix first, so a specific route wins over a general one.
        self.routes = tuple(sorted(routes, key=lambda r: len(r.prefix), reverse=True))

    def match(self, path: str) -> Route | None:
        for route in self.routes:
            if route.matches(path):
                return route
        return None
