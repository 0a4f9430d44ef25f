"""The Prometheus rules and configs in observability/prometheus: promtool's checks, its unit
tests, and that every alert has a case where it fires and one where it stays silent."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.databases import service_unavailable

PROMETHEUS = Path(__file__).resolve().parents[2] / "observability" / "prometheus"
RULES = sorted((PROMETHEUS / "rules").glob("*.yml"))
UNIT_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))
# Every Prometheus configuration: the local one, and docker-compose's where it is.
COMPOSE_CONFIG = PROMETHEUS.parents[1] / "deploy" / "compose" / "prometheus.yml"
CONFIGS = sorted(
    path
    for path in (*PROMETHEUS.glob("*.yml"), COMPOSE_CONFIG)
    if path.is_file() and "scrape_configs" in (yaml.safe_load(path.read_text()) or {})
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        service_unavailable("promtool is not installed (apt-get install prometheus)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=110, check=False)


def _alerts() -> list[str]:
    names = []
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            names += [rule["alert"] for rule in group["rules"] if "alert" in rule]
    return names


def _cases() -> list[dict[str, Any]]:
    cases = []
    for path in UNIT_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            cases += test.get("alert_rule_test", [])
    return cases


def test_there_are_rules_unit_tests_and_a_config() -> None:
    assert len(RULES) >= 5
    assert UNIT_TESTS
    assert PROMETHEUS / "local.yml" in CONFIGS


@pytest.mark.parametrize("path", RULES, ids=lambda p: p.name)
def test_promtool_checks_each_rules_file(path: Path) -> None:
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_promtool_checks_each_config(path: Path) -> None:
    done = promtool("check", "config", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path", UNIT_TESTS, ids=lambda p: p.name)
def test_promtool_unit_tests_pass(path: Path) -> None:
    done = promtool("test", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_rule_names_are_unique() -> None:
    seen: list[str] = []
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            seen += [rule.get("record") or rule["alert"] for rule in group["rules"]]
    assert sorted(name for name in set(seen) if seen.count(name) > 1) == []


@pytest.mark.parametrize("alert", _alerts())
def test_every_alert_fires_in_one_case_and_stays_silent_in_another(alert: str) -> None:
    cases = [case for case in _cases() if case["alertname"] == alert]
    assert any(case.get("exp_alerts") for case in cases), f"no case where {alert} fires"
    assert any(not case.get("exp_alerts") for case in cases), f"no case where {alert} is silent"


def test_a_failing_unit_test_fails(tmp_path: Path) -> None:
    """The unit tests can fail: a case expecting silence where the alert fires is reported."""
    (tmp_path / "rules").mkdir()
    shutil.copy(PROMETHEUS / "rules" / "alerts.yml", tmp_path / "rules" / "alerts.yml")
    shutil.copy(PROMETHEUS / "rules" / "edge.yml", tmp_path / "rules" / "edge.yml")
    wrong = {
        "rule_files": ["rules/alerts.yml", "rules/edge.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": 'up{job="gateway",instance="a"}', "values": "0x10"}],
                "alert_rule_test": [
                    {"eval_time": "5m", "alertname": "TargetDown", "exp_alerts": []}
                ],
            }
        ],
    }
    (tmp_path / "wrong.yml").write_text(yaml.safe_dump(wrong))
    done = promtool("test", "rules", str(tmp_path / "wrong.yml"))
    assert done.returncode != 0
    assert "TargetDown" in done.stdout + done.stderr
