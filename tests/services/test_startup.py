"""Every service starts on its defaults, and refuses bad configuration in one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from narthex.testing.processes import Spec, module_argv, start, stop
from tests.support.services import run_service, wait_ready

pytestmark = pytest.mark.slow

SERVICES = ("gateway", "auth", "features", "inference", "analytics")


def start_and_fail(service: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", f"narthex.{service}"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("service", SERVICES)
def test_non_numeric_port_stops_start_up_naming_the_setting(service: str) -> None:
    setting = f"NARTHEX_{service.upper()}_PORT"
    result = start_and_fail(service, {setting: "eighty"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert setting in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_secret_in_production_stops_auth_naming_it() -> None:
    result = start_and_fail("auth", {"NARTHEX_AUTH_ENV": "prod"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "NARTHEX_AUTH_KEY_PEPPER" in lines[0]


def test_bad_upstream_url_stops_the_gateway() -> None:
    result = start_and_fail("gateway", {"NARTHEX_GATEWAY_INFERENCE_URL": "not a url"})
    assert result.returncode == 2
    assert "NARTHEX_GATEWAY_INFERENCE_URL" in result.stderr


@pytest.mark.parametrize("service", SERVICES[1:])
def test_service_starts_ready_with_docs_and_metrics(service: str, tmp_path: Path) -> None:
    with run_service(service, tmp_path) as running:
        assert httpx.get(running.url + "/healthz").json() == {"status": "ok"}
        assert httpx.get(running.url + "/openapi.json").json()["info"]["title"] == (
            f"narthex {service}"
        )
        assert "http_requests_total" in httpx.get(running.url + "/metrics").text
    # Stopped by SIGTERM: uvicorn drains, runs the lifespan's shutdown, then re-raises
    # the signal so the exit status still says why it stopped.
    assert running.process.returncode in (0, -signal.SIGTERM)
    events = [line["event"] for line in running.log_lines()]
    assert "Application shutdown complete." in events


def test_with_nothing_configured_auth_refuses_its_placeholder_pepper() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NARTHEX_")}
    result = subprocess.run(
        [sys.executable, "-m", "narthex.auth"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "NARTHEX_AUTH_KEY_PEPPER" in result.stderr


def test_with_nothing_configured_a_service_serves_no_api_docs(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NARTHEX_")}
    # Only where to listen: nothing else is said.
    spec = Spec("features", module_argv("narthex.features"), {"NARTHEX_FEATURES_PORT": "{port}"})
    service = start(spec, tmp_path, base_env=env)
    try:
        wait_ready(service, 60.0)  # a busy machine starts a process slowly
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert httpx.get(service.url + path).status_code == 404, path
        assert httpx.get(service.url + "/healthz").status_code == 200
    finally:
        stop(service.process)
