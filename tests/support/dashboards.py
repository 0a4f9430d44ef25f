"""The metric names behind the Grafana dashboards in observability/: every panel's and
variable's PromQL parsed (promql-parser), recording rules resolved to the metrics they read,
and the metric names a live /metrics page declares."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import promql_parser
import yaml
from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "DASHBOARDS",
    "RULES",
    "dashboard_queries",
    "load_dashboards",
    "metric_names",
    "recording_rules",
    "scraped_names",
    "source_metrics",
]

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "observability" / "grafana" / "dashboards"
RULES = ROOT / "observability" / "prometheus" / "rules"

# Grafana's built-in interval variables: any duration parses the same.
_INTERVALS = re.compile(
    r"\$(?:__rate_interval|__interval|__range)\b|\$\{(?:__rate_interval|__interval|__range)\}"
)
# Dashboard variables ($model, ${model}, ${model:regex}): only ever label values here.
_VARIABLE = re.compile(r"\$\{\w+(?::\w+)?\}|\$\w+")
# Variable queries that are not PromQL: label_values(<selector>, label) and the like.
_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.*),\s*\w+\s*\)\s*$")
_QUERY_RESULT = re.compile(r"^\s*query_result\((?P<expr>.*)\)\s*$")
# What a family of each type exposes, beyond its own name.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("_count", "_sum", "_created"),
}


def load_dashboards(directory: Path = DASHBOARDS) -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))}


def _panels(panels: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row holds its panels


def dashboard_queries(board: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable, variables substituted."""
    found = []
    for panel in _panels(board.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                found.append((f"panel {panel.get('title')!r}", _substitute(target["expr"])))
    for variable in board.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]
        text = query.get("query", "") if isinstance(query, dict) else str(query)
        if match := _LABEL_VALUES.match(text) or _QUERY_RESULT.match(text):
            text = match.group(match.lastgroup or 1)
        found.append((f"variable ${variable['name']}", _substitute(text)))
    return found


def _substitute(expr: str) -> str:
    return _VARIABLE.sub("x", _INTERVALS.sub("5m", expr))


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects (the names of its vector selectors)."""
    names: set[str] = set()

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for matcher in node.matchers.matchers:
                if matcher.name == "__name__" and matcher.op == promql_parser.MatchOp.Equal:
                    names.add(matcher.value)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def recording_rules(directory: Path = RULES) -> dict[str, str]:
    """Each recorded name and its expression (a name recorded twice keeps both, joined)."""
    rules: dict[str, str] = {}
    for path in sorted(directory.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    previous = rules.get(rule["record"])
                    expr = str(rule["expr"])
                    rules[rule["record"]] = f"({previous}) or ({expr})" if previous else expr
    return rules


def source_metrics(expr: str, rules: Mapping[str, str]) -> set[str]:
    """The exported metrics `expr` reads, recording rules followed down to them."""
    sources: set[str] = set()
    pending, seen = metric_names(expr), set[str]()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in rules:
            pending |= metric_names(rules[name])
        else:
            sources.add(name)
    return sources


def scraped_names(text: str) -> set[str]:
    """Every series name a /metrics page declares, with a family's suffixes (`_total`,
    `_bucket`, ...), whether or not the family has a sample yet."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names
