"""RouteTable: which public path goes to which upstream (pure data, no I/O)."""

from __future__ import annotations

import pytest

from narthex.gateway.routing import ROUTES, UPSTREAMS, Route, RouteTable


def upstream_of(path: str, table: RouteTable | None = None) -> str | None:
    route = (table or RouteTable()).match(path)
    return None if route is None else route.upstream


@pytest.mark.parametrize(
    ("path", "upstream"),
    [
        ("/v1/models/x/predict", "inference"),
        ("/v1/embeddings", "inference"),
        ("/v2/models/iris/infer", "inference"),
        ("/v1/events/transactions", "features"),
        ("/v1/usage", "analytics"),
        ("/v1/auth/token", "auth"),
        ("/.well-known/jwks.json", "auth"),
        ("/v1/keys/abc", "auth"),
        # Three specific routes under one shared /v1/admin head, three upstreams.
        ("/v1/admin/tenants/t1", "auth"),
        ("/v1/admin/models/m1/versions", "inference"),
        ("/v1/admin/drift/m1", "analytics"),
    ],
)
def test_the_default_table_sends_each_public_path_to_its_upstream(path: str, upstream: str) -> None:
    assert upstream_of(path) == upstream


def test_longest_prefix_wins_whatever_the_declaration_order() -> None:
    general, specific = Route("/v1", "auth"), Route("/v1/models", "inference")
    deeper = Route("/v1/models/special", "analytics")
    for order in [(general, specific, deeper), (deeper, specific, general)]:
        table = RouteTable(order)
        assert upstream_of("/v1/models/special/run", table) == "analytics"
        assert upstream_of("/v1/models/x/predict", table) == "inference"
        assert upstream_of("/v1/models", table) == "inference"
        assert upstream_of("/v1/other", table) == "auth"


def test_prefix_matches_whole_segments_only() -> None:
    table = RouteTable()
    assert upstream_of("/v2x", table) is None
    assert upstream_of("/v2x/models", table) is None
    assert upstream_of("/v1/modelsx", table) is None
    assert upstream_of("/v1/usagex/y", table) is None
    # A path that only shares a prefix with a specific route falls to no route at all
    # rather than to a shorter one it does not belong under.
    assert upstream_of("/v1/admin", table) is None


def test_exact_path_and_trailing_slash_match() -> None:
    table = RouteTable()
    assert upstream_of("/v2", table) == "inference"
    assert upstream_of("/v2/", table) == "inference"
    assert upstream_of("/v1/usage", table) == "analytics"


def test_unknown_paths_match_nothing() -> None:
    table = RouteTable()
    # The status routes are the gateway's own: answered from its probes, never proxied.
    paths = ["/", "/v1", "/v1/nope", "/healthz", "/readyz", "/metrics", "/v3/models"]
    for path in [*paths, *(f"/v1/status/{name}" for name in UPSTREAMS)]:
        assert table.match(path) is None, path


def test_an_unknown_upstream_is_rejected_at_construction() -> None:
    with pytest.raises(ValueError, match="payments"):
        RouteTable((Route("/v1/models", "inference"), Route("/v1/pay", "payments")))


def test_every_route_names_one_of_the_four_upstreams() -> None:
    assert set(UPSTREAMS) == {"auth", "features", "inference", "analytics"}
    assert {route.upstream for route in ROUTES} == set(UPSTREAMS)
    prefixes = [route.prefix for route in ROUTES]
    assert len(prefixes) == len(set(prefixes)), "a prefix is declared twice"
    for route in ROUTES:
        assert route.prefix.startswith("/"), route
        assert not route.prefix.endswith("/"), route


def test_routes_are_tried_longest_first() -> None:
    lengths = [len(route.prefix) for route in RouteTable().routes]
    assert lengths == sorted(lengths, reverse=True)


def test_every_route_that_is_not_public_names_who_may_call_it() -> None:
    for route in RouteTable().routes:
        assert route.public or route.scope or route.role, route


def test_only_the_token_endpoint_and_signing_keys_are_public() -> None:
    public = {route.prefix for route in RouteTable().routes if route.public}
    assert public == {"/v1/auth/token", "/.well-known/jwks.json"}


def test_only_the_signing_keys_are_answered_from_the_shared_cache() -> None:
    """A cached answer is the same for every caller: only a public, caller-independent
    GET may be one."""
    cached = [route for route in RouteTable().routes if route.cached]
    assert [route.prefix for route in cached] == ["/.well-known/jwks.json"]
    for route in cached:
        assert route.public
        assert route.methods == frozenset({"GET", "HEAD"})
        assert not route.limited
        assert not route.forward_credentials


def test_every_admin_path_requires_the_admin_role_and_the_admin_scope() -> None:
    admin_routes = [r for r in RouteTable().routes if r.prefix.startswith("/v1/admin/")]
    assert len(admin_routes) == 8
    for route in admin_routes:
        assert (route.role, route.scope) == ("admin", "admin"), route
