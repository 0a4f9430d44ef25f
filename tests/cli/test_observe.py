"""`narthex up --observe`: Debian's prometheus beside the real stack, with the project's config
and rules; every target up, a recording rule answering, and every metric the Grafana
dashboards query present in a live /metrics scrape of the services."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from narthex.cli.observe import ObserveError, find_observability, render_config
from tests.support.dashboards import (
    dashboard_queries,
    load_dashboards,
    recording_rules,
    scraped_names,
    source_metrics,
)
from tests.support.databases import service_unavailable
from tests.support.prometheus import wait_for
from tests.support.up import (
    READY_TIMEOUT_S,
    STOP_TIMEOUT_S,
    SUMMARY_END,
    Up,
    free_port_base,
    narthex_argv,
    narthex_env,
    pid_running,
    read_run_file,
    running_up,
)

# Starting the five services and Prometheus takes a minute or more on a busy 2-CPU box.
STARTUP_TIMEOUT_S = 2 * READY_TIMEOUT_S
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SERVICES = ("gateway", "auth", "features", "inference", "analytics")
ROOT = Path(__file__).resolve().parents[2]

# Series Prometheus makes itself for every target, not found on any /metrics page.
PROMETHEUS_MADE = {"up"}


# -- the config, offline ------------------------------------------------------------------------


def test_the_config_scrapes_this_runs_ports_with_absolute_rule_files() -> None:
    ports = {name: 21000 + i for i, name in enumerate(SERVICES)}
    config = render_config(find_observability(ROOT), "0.0.0.0", ports)
    targets = {
        job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]
    }
    assert targets == {name: [f"127.0.0.1:{port}"] for name, port in ports.items()}
    (rules,) = config["rule_files"]
    assert Path(rules).is_absolute()
    assert sorted(Path(rules).parent.glob(Path(rules).name)) == sorted(
        (ROOT / "observability" / "prometheus" / "rules").glob("*.yml")
    )


def test_a_config_without_a_services_job_is_refused(tmp_path: Path) -> None:
    (tmp_path / "prometheus").mkdir()
    local = yaml.safe_load((ROOT / "observability" / "prometheus" / "local.yml").read_text())
    local["scrape_configs"] = [j for j in local["scrape_configs"] if j["job_name"] != "features"]
    (tmp_path / "prometheus" / "local.yml").write_text(yaml.safe_dump(local))
    with pytest.raises(ObserveError, match="no scrape job for features"):
        render_config(tmp_path, "127.0.0.1", dict.fromkeys(SERVICES, 1))


def test_observability_is_found_from_a_subfolder_of_the_checkout() -> None:
    assert find_observability(ROOT / "cli" / "src") == ROOT / "observability"


def test_without_prometheus_observe_starts_nothing_and_says_why(tmp_path: Path) -> None:
    # PATH names only a folder without prometheus; python itself is called by its path.
    env = narthex_env(PATH=str(tmp_path))
    base = free_port_base(7)
    done = subprocess.run(
        narthex_argv("up", "--observe", "--port-base", str(base), "--state-dir", str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 1
    assert "apt-get install prometheus" in done.stderr
    assert "nothing was started" in done.stderr
    assert not (tmp_path / "logs").exists()


# -- the real stack -----------------------------------------------------------------------------


@dataclass
class Observed:
    up: Up
    prometheus: str
    gateway: str
    demo_key: str


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    if shutil.which("prometheus") is None:
        service_unavailable("prometheus is not installed (apt-get install prometheus)")
    state_dir = tmp_path_factory.mktemp("observe")
    # A later --timeout wins over the one Up passes: six processes start here, not five.
    args = ("--observe", "--timeout", str(STARTUP_TIMEOUT_S))
    with running_up(state_dir, narthex_env(), args, port_count=6) as up:
        up.wait_for(SUMMARY_END, STARTUP_TIMEOUT_S + 15)
        up.remember_children(at_least=6)
        url = re.search(r"prometheus (http://\S+)/targets", up.output)
        key = re.search(r"demo key\s+(\S+)", up.output)
        assert url is not None, up.output
        assert key is not None, up.output
        yield Observed(up, url.group(1), f"http://127.0.0.1:{up.port_base}", key.group(1))


def _targets(prometheus: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{prometheus}/api/v1/targets", timeout=5.0)
    response.raise_for_status()
    targets: list[dict[str, Any]] = response.json()["data"]["activeTargets"]
    return targets


def _drive(observed: Observed) -> None:
    """An embedding, a fraud score and a quota read through the gateway."""
    headers = {"Authorization": f"Bearer {observed.demo_key}"}
    instance = {"account_id": "obs", "merchant_id": "m1", "amount": 12.0, "currency": "USD"}
    with httpx.Client(base_url=observed.gateway, headers=headers, timeout=30.0) as client:
        embedded = client.post("/v1/embeddings", json={"model": "minilm", "input": "observe"})
        scored = client.post("/v1/models/fraud/predict", json={"instances": [instance]})
        quota = client.get("/v1/quota")
    assert [embedded.status_code, scored.status_code, quota.status_code] == [200, 200, 200]


def test_prometheus_is_on_the_port_after_the_services_and_loopback_only(
    observed: Observed,
) -> None:
    assert observed.prometheus == f"http://127.0.0.1:{observed.up.port_base + 6}"


def test_every_service_is_a_target_and_up(observed: Observed) -> None:
    deadline = time.monotonic() + 30
    while True:
        targets = _targets(observed.prometheus)
        health = {t["labels"]["job"]: t["health"] for t in targets}
        if health == dict.fromkeys(SERVICES, "up") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert health == dict.fromkeys(SERVICES, "up"), targets
    ports = {t["labels"]["job"]: t["scrapeUrl"] for t in targets}
    assert ports == {
        name: f"http://127.0.0.1:{observed.up.port_base + i}/metrics"
        for i, name in enumerate(SERVICES)
    }


def test_every_rule_group_is_loaded_and_healthy(observed: Observed) -> None:
    response = httpx.get(f"{observed.prometheus}/api/v1/rules", timeout=5.0)
    groups = response.json()["data"]["groups"]
    expected = set()
    for path in (ROOT / "observability" / "prometheus" / "rules").glob("*.yml"):
        expected |= {group["name"] for group in yaml.safe_load(path.read_text())["groups"]}
    assert {group["name"] for group in groups} == expected
    unhealthy = [
        (rule["name"], rule.get("lastError"))
        for group in groups
        for rule in group["rules"]
        if rule["health"] not in ("ok", "unknown")
    ]
    assert unhealthy == []


def test_a_recording_rule_answers_with_the_traffic_sent(observed: Observed) -> None:
    served = 'sum(http_requests_total{service="gateway", route="/v1/embeddings"})'
    _drive(observed)
    before = wait_for(observed.prometheus, served, 1)
    _drive(observed)
    wait_for(observed.prometheus, served, before + 1)
    rate = 'sum(service_route:http_requests:rate5m{service="gateway", route="/v1/embeddings"})'
    assert wait_for(observed.prometheus, rate, 1e-9) > 0
    # No 5xx was sent: the SLO's error ratio is 0, recorded, not missing. Its group is
    # evaluated on its own tick, so wait for it to be recorded at all, then read it.
    slo = "gateway:slo_availability_errors:ratio_rate5m"
    assert wait_for(observed.prometheus, slo, 0.0) == 0


def test_every_dashboard_metric_is_in_a_live_scrape(observed: Observed) -> None:
    _drive(observed)
    scraped: set[str] = set()
    with httpx.Client(timeout=10.0) as client:
        for offset in range(len(SERVICES)):
            page = client.get(f"http://127.0.0.1:{observed.up.port_base + offset}/metrics")
            scraped |= scraped_names(page.text)
        names = client.get(f"{observed.prometheus}/api/v1/label/__name__/values").json()
    scraped |= PROMETHEUS_MADE & set(names["data"])
    rules = recording_rules()
    missing: dict[str, list[str]] = {}
    for board_name, board in load_dashboards().items():
        for where, expr in dashboard_queries(board):
            for metric in source_metrics(expr, rules) - scraped:
                missing.setdefault(metric, []).append(f"{board_name} {where}")
    assert missing == {}


def test_ctrl_c_stops_prometheus_with_the_services(observed: Observed) -> None:
    up = observed.up
    prometheus_pid = read_run_file(up.state_dir)["children"]["prometheus"]
    assert b"prometheus" in Path(f"/proc/{prometheus_pid}/cmdline").read_bytes()
    up.proc.send_signal(signal.SIGINT)
    assert up.wait(STOP_TIMEOUT_S) == 0, up.output
    assert not pid_running(prometheus_pid)
    assert not (up.state_dir / "prometheus" / "data").joinpath("lock").exists()
