"""The Grafana dashboards and provisioning in observability/grafana, checked offline: every
query parses, names only recording rules that exist, and uses the provisioned datasource.
(Whether the metrics behind them are really exported: tests/cli/test_observe.py, live.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.dashboards import (
    dashboard_queries,
    load_dashboards,
    metric_names,
    recording_rules,
    scraped_names,
    source_metrics,
)

GRAFANA = Path(__file__).resolve().parents[2] / "observability" / "grafana"
BOARDS = load_dashboards()
RULES = recording_rules()


def _datasource() -> dict[str, Any]:
    config = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    (source,) = config["datasources"]
    return dict(source)


def _panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in board["panels"]:
        found.append(panel)
        found += panel.get("panels", [])
    return found


def test_the_four_dashboards_are_there_with_unique_uids() -> None:
    assert set(BOARDS) == {"platform.json", "edge.json", "inference.json", "analytics.json"}
    uids = [board["uid"] for board in BOARDS.values()]
    assert sorted(uids) == sorted(f"narthex-{name.removesuffix('.json')}" for name in BOARDS)


def test_the_datasource_is_compose_prometheus() -> None:
    source = _datasource()
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"


def test_the_dashboards_provider_reads_a_folder() -> None:
    config = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "narthex.yml").read_text())
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_every_panel_queries_the_provisioned_datasource(name: str) -> None:
    uid = _datasource()["uid"]
    panels = [panel for panel in _panels(BOARDS[name]) if panel["type"] != "row"]
    assert panels
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert {target["datasource"]["uid"] for target in panel["targets"]} == {uid}
        assert len({target["refId"] for target in panel["targets"]}) == len(panel["targets"])


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_every_query_parses_and_names_only_known_recording_rules(name: str) -> None:
    queries = dashboard_queries(BOARDS[name])
    assert queries
    for where, expr in queries:
        names = metric_names(expr)  # raises on a query Prometheus would refuse
        assert names, f"{name} {where}: no metric in {expr!r}"
        unknown = {n for n in names if ":" in n and n not in RULES}
        assert not unknown, f"{name} {where}: no recording rule {sorted(unknown)}"


def test_panel_grid_positions_do_not_overlap() -> None:
    for name, board in BOARDS.items():
        cells: set[tuple[int, int]] = set()
        for panel in board["panels"]:
            grid = panel["gridPos"]
            mine = {
                (grid["x"] + dx, grid["y"] + dy)
                for dx in range(grid["w"])
                for dy in range(grid["h"])
            }
            assert grid["x"] + grid["w"] <= 24, f"{name}: {panel['title']} is too wide"
            assert not cells & mine, f"{name}: {panel['title']} overlaps another panel"
            cells |= mine


def test_recording_rules_resolve_to_exported_metrics() -> None:
    """Rules built on rules end at metrics a service exports (no rule without a source)."""
    for name, expr in RULES.items():
        sources = source_metrics(expr, RULES)
        assert sources, name
        assert not {s for s in sources if ":" in s}, f"{name} reads an unknown rule"


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (route) (rate(http_requests_total{service="x"}[5m]))', {"http_requests_total"}),
        ("topk(5, a:b:rate5m) / on (job) group_left b offset 5m", {"a:b:rate5m", "b"}),
        ('{__name__="up", job="x"} == 0 and bool_thing > bool 1', {"up", "bool_thing"}),
        ('histogram_quantile(0.9, sum by (le) (rate(h_bucket{model=~"x"}[5m])))', {"h_bucket"}),
        ('label_replace(m, "a", "$1", "b", "(.*)") unless vector(0)', {"m"}),
    ],
)
def test_metric_names_are_the_selectors_not_functions_labels_or_keywords(
    expr: str, names: set[str]
) -> None:
    assert metric_names(expr) == names


def test_dashboard_variables_and_intervals_are_substituted_before_parsing() -> None:
    board = {
        "panels": [
            {
                "title": "t",
                "targets": [
                    {"expr": 'rate(a_total{m=~"$model", v="${version}"}[$__rate_interval])'}
                ],
            }
        ],
        "templating": {
            "list": [
                {
                    "name": "model",
                    "type": "query",
                    "query": {"query": 'label_values(b{x="1"}, model)'},
                }
            ]
        },
    }
    queries = dashboard_queries(board)
    assert [sorted(metric_names(expr)) for _, expr in queries] == [["a_total"], ["b"]]


def test_a_scrape_declares_families_with_their_suffixes_samples_or_not() -> None:
    page = (
        "# HELP c_total A counter without a sample yet.\n"
        "# TYPE c_total counter\n"
        "# HELP h A histogram.\n"
        "# TYPE h histogram\n"
        'h_bucket{le="1.0"} 1.0\n'
        'h_bucket{le="+Inf"} 1.0\n'
        "h_count 1.0\n"
        "h_sum 0.5\n"
        "# HELP g A gauge.\n"
        "# TYPE g gauge\n"
        "g 3.0\n"
    )
    names = scraped_names(page)
    assert {"c_total", "h_bucket", "h_count", "h_sum", "g"} <= names
    assert "h_total" not in names
    assert "other_total" not in names
