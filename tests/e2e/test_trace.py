"""One trace id across client -> gateway -> service, over real HTTP, in both services' logs."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.support.services import Service, run_service

pytestmark = pytest.mark.slow


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


def test_one_trace_id_across_two_hops_in_both_logs(tmp_path: Path) -> None:
    with run_service("analytics", tmp_path) as analytics:
        gateway_env = {
            "NARTHEX_GATEWAY_ANALYTICS_URL": analytics.url,
            # The other upstreams are not needed for this path.
            "NARTHEX_GATEWAY_AUTH_URL": analytics.url,
            "NARTHEX_GATEWAY_FEATURES_URL": analytics.url,
            "NARTHEX_GATEWAY_INFERENCE_URL": analytics.url,
        }
        with run_service("gateway", tmp_path, gateway_env) as gateway:
            trace_id = "0af7651916cd43dd8448eb211c80319c"
            response = httpx.get(
                gateway.url + "/v1/status/analytics",
                headers={
                    "traceparent": f"00-{trace_id}-b7ad6b7169203331-01",
                    "X-Request-ID": "e2e-trace-0001",
                },
                timeout=5.0,
            )
            assert response.status_code == 200
            assert response.headers["x-request-id"] == "e2e-trace-0001"

            gateway_line = wait_for_line(gateway, "/v1/status/analytics", "e2e-trace-0001")
            upstream_line = wait_for_line(analytics, "/readyz", "e2e-trace-0001")

    assert gateway_line["trace_id"] == trace_id
    assert upstream_line["trace_id"] == trace_id
    # Same trace, different hops: each service logs its own span.
    assert gateway_line["span_id"] != upstream_line["span_id"]
    assert gateway_line["request_id"] == upstream_line["request_id"] == "e2e-trace-0001"
    assert gateway_line["service"] == "gateway"
    assert upstream_line["service"] == "analytics"


def test_trace_id_is_made_at_the_edge_when_the_client_sends_none(tmp_path: Path) -> None:
    with run_service("analytics", tmp_path) as analytics:
        env = {
            f"NARTHEX_GATEWAY_{n}_URL": analytics.url
            for n in ("AUTH", "FEATURES", "INFERENCE", "ANALYTICS")
        }
        with run_service("gateway", tmp_path, env) as gateway:
            response = httpx.get(gateway.url + "/v1/status/analytics", timeout=5.0)
            assert response.status_code == 200
            request_id = response.headers["x-request-id"]  # made by the gateway
            gateway_line = wait_for_line(gateway, "/v1/status/analytics", request_id)
            upstream_line = wait_for_line(analytics, "/readyz", request_id)
    assert isinstance(gateway_line["trace_id"], str)
    assert len(gateway_line["trace_id"]) == 32
    assert upstream_line["trace_id"] == gateway_line["trace_id"]
