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
        ("/v1/status/features", "features"),
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
    assert upstream_of("/v1/status/inferencex", table) is None
    # A path that only shares a prefix with a specific route falls to no route at all
    # rather than to a shorter one it does not belong under.
    assert upstream_of("/v1/admin", table) is None


def test_exact_path_and_trailing_slash_match() -> None:
    table = RouteTable()
    assert upstream_of("/v2", table) == "inference"
    assert upstream_of("/v2/", table) == "inference"
    assert upstream_of("/v1/usage", table) == "analytics"
    route = table.match("/v1/status/auth")
    assert route is not None
    assert route.rewrite == "/readyz"
    assert route.methods == frozenset({"GET"})


def test_unknown_paths_match_nothing() -> None:
    table = RouteTable()
    for path in ["/", "/v1", "/v1/nope", "/healthz", "/readyz", "/metrics", "/v3/models"]:
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


def test_each_upstream_has_a_get_only_status_route_rewritten_to_readyz() -> None:
    table = RouteTable()
    for name in UPSTREAMS:
        route = table.match(f"/v1/status/{name}")
        assert route == Route(
            f"/v1/status/{name}",
            name,
            rewrite="/readyz",
            methods=frozenset({"GET"}),
            public=True,
        )


def test_routes_are_tried_longest_first() -> None:
    lengths = [len(route.prefix) for route in RouteTable().routes]
    assert lengths == sorted(lengths, reverse=True)


def test_every_route_that_is_not_public_names_who_may_call_it() -> None:
    for route in RouteTable().routes:
        assert route.public or route.scope or route.role, route


def test_only_the_token_endpoint_signing_keys_and_status_are_public() -> None:
    public = {route.prefix for route in RouteTable().routes if route.public}
    assert public == {
        "/v1/auth/token",
        "/.well-known/jwks.json",
        *(f"/v1/status/{name}" for name in UPSTREAMS),
    }


def test_every_admin_path_requires_the_admin_role() -> None:
    for route in RouteTable().routes:
        if route.prefix.startswith("/v1/admin/"):
            assert route.role == "admin", route
