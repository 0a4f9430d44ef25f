"""One trace id across client -> gateway -> service, over real HTTP, in both services' logs.

The hop traced is the token exchange (the gateway relays it to auth as it comes): the
status routes no longer make a call per request, they answer from the gateway's probes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.platform import Edge, edge, running
from tests.support.services import Service

pytestmark = pytest.mark.slow

TOKEN = "/v1/auth/token"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    with edge(tmp_path_factory.mktemp("trace")) as started:
        yield started


def wait_for_line(
    service: Service, route: str, request_id: str, timeout: float = 5.0
) -> dict[str, object]:
    """The access line for one request (by its id: readiness polls log lines too)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in service.log_lines():
            if (
                line.get("event") == "request"
                and line.get("route") == route
                and line.get("request_id") == request_id
            ):
                return line
        time.sleep(0.05)
    raise AssertionError(f"no access line for {route} {request_id} in {service.name}'s log")


def test_one_trace_id_across_two_hops_in_both_logs(platform: Edge, tmp_path: Path) -> None:
    with running([platform.gateway("gateway")], tmp_path) as (gateway,):
        trace_id = "0af7651916cd43dd8448eb211c80319c"
        response = httpx.post(
            gateway.url + TOKEN,
            headers={
                "X-API-Key": platform.admin_key,
                "traceparent": f"00-{trace_id}-b7ad6b7169203331-01",
                "X-Request-ID": "e2e-trace-0001",
            },
            timeout=5.0,
        )
        assert response.status_code == 200, response.text
        assert response.headers["x-request-id"] == "e2e-trace-0001"

        gateway_line = wait_for_line(gateway, TOKEN, "e2e-trace-0001")
        upstream_line = wait_for_line(platform.auth, TOKEN, "e2e-trace-0001")

    assert gateway_line["trace_id"] == trace_id
    assert upstream_line["trace_id"] == trace_id
    # Same trace, different hops: each service logs its own span.
    assert gateway_line["span_id"] != upstream_line["span_id"]
    assert gateway_line["request_id"] == upstream_line["request_id"] == "e2e-trace-0001"
    assert gateway_line["service"] == "gateway"
    assert upstream_line["service"] == "auth"


def test_trace_id_is_made_at_the_edge_when_the_client_sends_none(
    platform: Edge, tmp_path: Path
) -> None:
    with running([platform.gateway("gateway")], tmp_path) as (gateway,):
        response = httpx.post(
            gateway.url + TOKEN, headers={"X-API-Key": platform.admin_key}, timeout=5.0
        )
        assert response.status_code == 200, response.text
        request_id = response.headers["x-request-id"]  # made by the gateway
        gateway_line = wait_for_line(gateway, TOKEN, request_id)
        upstream_line = wait_for_line(platform.auth, TOKEN, request_id)
    assert isinstance(gateway_line["trace_id"], str)
    assert len(gateway_line["trace_id"]) == 32
    assert upstream_line["trace_id"] == gateway_line["trace_id"]
