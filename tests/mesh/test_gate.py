"""The promotion gate: its arithmetic, and `narthex mesh promote --prometheus` against a real
Prometheus scraping real inference processes, one of them failing every request."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from narthex.cli.main import app
from narthex.cli.mesh_gate import Measured, compare
from narthex.cli.mesh_plan import Gate, Plans, read_weights
from tests.support.models import builtin_repository
from tests.support.platform import edge, exchange, inference_spec, running
from tests.support.prometheus import prometheus, query, wait_for
from tests.support.services import Service

GATE = Gate(
    min_requests=50, max_error_rate_increase=0.01, max_p99_ratio=1.25, p99_slack_seconds=0.025
)
PROBES = 'route!~"/healthz|/readyz|/metrics"'


def test_a_canary_with_more_errors_is_refused_saying_by_how_much() -> None:
    verdict = compare(
        Measured("v1", 1000, 2, 0.010), Measured("v2", 200, 10, 0.010), GATE, canary_weight=10
    )
    assert not verdict.passed
    assert verdict.reasons == [
        "error rate 5.00% on v2 against 0.20% on v1: 4.80 points worse,"
        " 3.80 points past the 1.00-point threshold"
    ]


def test_a_slower_canary_is_refused_saying_by_how_much() -> None:
    verdict = compare(
        Measured("v1", 1000, 0, 0.100), Measured("v2", 200, 0, 0.200), GATE, canary_weight=25
    )
    assert verdict.reasons == [
        "p99 200.0 ms on v2 against 100.0 ms on v1: +100.0 ms (x2.00),"
        " 75.0 ms past the allowed 125.0 ms (x1.25 or +25 ms)"
    ]


def test_small_latencies_get_the_slack_not_the_ratio() -> None:
    # 4 ms against 2 ms is twice as slow, yet within 25 ms: histogram buckets, not a regression.
    verdict = compare(Measured("v1", 900, 0, 0.002), Measured("v2", 100, 0, 0.004), GATE, 10)
    assert verdict.passed


def test_an_equal_canary_passes() -> None:
    verdict = compare(Measured("v1", 900, 1, 0.05), Measured("v2", 100, 0, 0.05), GATE, 10)
    assert verdict.passed
    assert verdict.reasons == []


def test_too_little_canary_traffic_is_refused() -> None:
    verdict = compare(Measured("v1", 900, 0, 0.05), Measured("v2", 12, 0, 0.05), GATE, 10)
    assert verdict.reasons == [
        "too little traffic to judge: v2 served 12 requests in 5m, the gate needs 50"
    ]


def test_the_first_step_needs_no_canary_traffic() -> None:
    verdict = compare(Measured("v1", 900, 0, 0.05), Measured("v2", 0, 0, None), GATE, 0)
    assert verdict.passed
    assert verdict.notes == ["v2 has no traffic yet: the first step is not compared"]


def test_the_shipped_plan_has_the_gate_and_its_queries() -> None:
    plans = Plans.load(Path(__file__).resolve().parents[2] / "mesh")
    assert plans.gate.queries is not None
    assert set(plans.gate.queries) == {"requests", "errors", "p99"}
    assert plans.canaries["inference"].steps == (10, 25, 50, 100)
    assert not math.isnan(plans.gate.max_p99_ratio)


# -- against a real Prometheus -----------------------------------------------------------------

REQUESTS = 60  # per version, above the plan's min_requests (50)


@dataclass(frozen=True)
class Versions:
    stable: Service
    failing: Service  # every request's deadline has passed before compute: 504
    healthy: Service
    token: str
    width: int
    directory: Path


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Versions]:
    repository = builtin_repository(["fraud"])
    directory = tmp_path_factory.mktemp("gate")
    with edge(directory) as platform:
        specs = [
            inference_spec("inference-v1", platform.auth.url, repository, models="fraud"),
            inference_spec(
                "inference-v2-failing",
                platform.auth.url,
                repository,
                models="fraud",
                request_timeout="0.000001",
            ),
            inference_spec("inference-v2-healthy", platform.auth.url, repository, models="fraud"),
        ]
        with running(specs, directory) as (stable, failing, healthy):
            token = exchange(platform.auth.url, platform.admin_key)
            metadata = httpx.get(
                stable.url + "/v2/models/fraud",
                headers={"Authorization": f"Bearer {token}"},
                timeout=10,
            ).json()
            width = int(metadata["inputs"][0]["shape"][-1])
            yield Versions(stable, failing, healthy, token, width, directory)


def _infer(client: httpx.Client, service: Service, width: int) -> int:
    body = {"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, width],
                        "data": [0.5] * width}]}  # fmt: skip
    return client.post(service.url + "/v2/models/fraud/infer", json=body).status_code


def _served(server: Service, version: str) -> str:
    return f'sum(http_requests_total{{version="{version}",{PROBES}}})'


def _drive(server: Service, versions: Versions, canary: Service) -> dict[str, list[int]]:
    """Traffic to both versions, interleaved, once Prometheus has a sample of each to count
    from; returns when Prometheus has scraped all of it."""
    targets = {"v1": versions.stable, "v2": canary}
    statuses: dict[str, list[int]] = {"v1": [], "v2": []}
    headers = {"Authorization": f"Bearer {versions.token}"}
    with httpx.Client(headers=headers, timeout=10) as client:
        for version, service in targets.items():
            statuses[version].append(_infer(client, service, versions.width))
        baseline = {v: wait_for(server, _served(server, v), 1) for v in targets}
        for _ in range(REQUESTS):
            for version, service in targets.items():
                statuses[version].append(_infer(client, service, versions.width))
    for version in targets:
        wait_for(server, _served(server, version), baseline[version] + REQUESTS)
    return statuses


@dataclass(frozen=True)
class GateRun:
    statuses: dict[str, list[int]]  # what the clients saw, per version
    canary_errors: float | None  # 504s of the canary, as Prometheus counted them
    code: int
    out: str
    err: str


def _gate_run(versions: Versions, mesh_dir: Path, canary: Service, label: str) -> GateRun:
    """Prometheus scraping the stable version (v1) and `canary` (v2); both driven; then
    `narthex mesh set inference v2=10` and `narthex mesh promote --prometheus`."""
    # This machine is shared and small: one slow request moves a p99 of 60 by tens of ms.
    # The latency margin has its own tests above; here the error rate decides.
    plan = mesh_dir / "canary.yaml"
    plan.write_text(plan.read_text().replace("p99_slack_seconds: 0.025", "p99_slack_seconds: 1.0"))
    runner = CliRunner()
    with prometheus(
        [(versions.stable.url, {"version": "v1"}), (canary.url, {"version": "v2"})],
        versions.directory / f"prometheus-{label}",
    ) as server:
        statuses = _drive(server, versions, canary)
        where = ["--mesh-dir", str(mesh_dir)]
        assert runner.invoke(app, ["mesh", "set", "inference", "v2=10", *where]).exit_code == 0
        result = runner.invoke(app, ["mesh", "promote", "--prometheus", server.url, *where])
        errors = query(server, f'sum(http_requests_total{{version="v2",status="504",{PROBES}}})')
    return GateRun(statuses, errors, result.exit_code, result.stdout, result.stderr)


@pytest.mark.slow
def test_the_gate_refuses_a_failing_canary(versions: Versions, mesh_dir: Path) -> None:
    run = _gate_run(versions, mesh_dir, versions.failing, "failing")
    assert set(run.statuses["v1"]) == {200}
    assert set(run.statuses["v2"]) == {504}  # the canary really fails, server-side
    assert run.canary_errors is not None
    assert run.canary_errors >= REQUESTS
    assert run.code == 1
    assert "gate (5m): v1: " in run.out
    assert "0.00% errors" in run.out
    assert "refused to promote inference v2 from 10% to 25%: error rate 100.00% on v2" in run.err
    assert (
        "against 0.00% on v1: 100.00 points worse, 99.00 points past the 1.00-point threshold"
        in run.err
    )
    plan = Plans.load(mesh_dir).plan("inference")
    assert read_weights(plan)["canary"] == {"v1": 90, "v2": 10}  # nothing moved


@pytest.mark.slow
def test_the_gate_lets_a_healthy_canary_through(versions: Versions, mesh_dir: Path) -> None:
    run = _gate_run(versions, mesh_dir, versions.healthy, "healthy")
    assert set(run.statuses["v1"]) == set(run.statuses["v2"]) == {200}
    assert run.canary_errors is None  # not one 5xx
    assert run.code == 0, run.err
    assert "0.00% errors" in run.out
    assert "inference: v1=75 v2=25" in run.out
    plan = Plans.load(mesh_dir).plan("inference")
    assert read_weights(plan)["canary"] == {"v1": 75, "v2": 25}
