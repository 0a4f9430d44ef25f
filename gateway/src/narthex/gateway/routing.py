"""The gateway's route table: which public path goes to which upstream. Data, in one place."""

from __future__ import annotations

from dataclasses import dataclass

UPSTREAMS = ("auth", "features", "inference", "analytics")


@dataclass(frozen=True)
class Route:
    """`prefix` matches the path itself or anything below it (`/v2` matches `/v2/models`)."""

    prefix: str
    upstream: str
    # Send to this fixed upstream path instead of the request's own path.
    rewrite: str | None = None
    methods: frozenset[str] | None = None

    def matches(self, path: str) -> bool:
        return path == self.prefix or (
            path.startswith(self.prefix) and path[len(self.prefix)] == "/"
        )


ROUTES: tuple[Route, ...] = (
    # auth: token exchange, signing keys, a tenant's own keys, tenants and plans
    Route("/v1/auth", "auth"),
    Route("/.well-known/jwks.json", "auth", methods=frozenset({"GET", "HEAD"})),
    Route("/v1/keys", "auth"),
    Route("/v1/admin/tenants", "auth"),
    Route("/v1/admin/plans", "auth"),
    Route("/v1/admin/keys", "auth"),
    # inference: predictions, embeddings, the Open Inference Protocol, model admin
    Route("/v1/models", "inference"),
    Route("/v1/embeddings", "inference"),
    Route("/v2", "inference"),
    Route("/v1/admin/models", "inference"),
    # features: event ingestion
    Route("/v1/events", "features"),
    # analytics: usage and drift
    Route("/v1/usage", "analytics"),
    Route("/v1/admin/usage", "analytics"),
    Route("/v1/admin/drift", "analytics"),
    # each upstream's readiness, as the gateway sees it
    *(
        Route(f"/v1/status/{name}", name, rewrite="/readyz", methods=frozenset({"GET"}))
        for name in UPSTREAMS
    ),
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
