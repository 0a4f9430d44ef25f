"""Canary plans (mesh/canary.yaml) and the edits that move a canary's weights: round-trip
YAML, so that comments, key order and the formatting of every untouched line survive, and
atomic writes, so that a reader never sees half a file."""

from __future__ import annotations

import difflib
import io
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from narthex.cli.mesh_analyze import split_routes

__all__ = [
    "CanaryPlan",
    "EditError",
    "Gate",
    "Plans",
    "apply_weights",
    "parse_assignments",
    "read_weights",
    "write_atomically",
]

PLAN_FILE = "canary.yaml"


class EditError(ValueError):
    """A refused edit; the message says why, in the operator's terms."""


@dataclass(frozen=True)
class CanaryPlan:
    service: str
    file: Path  # absolute
    virtualservice: str
    stable: str
    canary: str
    steps: tuple[int, ...]

    @property
    def subsets(self) -> tuple[str, str]:
        return (self.stable, self.canary)


@dataclass(frozen=True)
class Gate:
    window: str = "5m"
    min_requests: float = 50
    max_error_rate_increase: float = 0.01
    max_p99_ratio: float = 1.25
    p99_slack_seconds: float = 0.025
    queries: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Plans:
    canaries: Mapping[str, CanaryPlan]
    gate: Gate

    @classmethod
    def load(cls, mesh_dir: Path) -> Plans:
        path = mesh_dir / PLAN_FILE
        raw = YAML(typ="safe").load(path.read_text()) or {}
        canaries = {}
        for service, entry in (raw.get("canaries") or {}).items():
            steps = tuple(int(step) for step in entry.get("steps") or ())
            if not steps or list(steps) != sorted(set(steps)) or steps[-1] != 100 or steps[0] <= 0:
                raise EditError(
                    f"{path}: canaries.{service}.steps must rise strictly from above 0 to 100,"
                    f" not {list(steps)}"
                )
            canaries[str(service)] = CanaryPlan(
                service=str(service),
                file=(mesh_dir / str(entry["file"])).resolve(),
                virtualservice=str(entry.get("virtualservice", service)),
                stable=str(entry.get("stable", "v1")),
                canary=str(entry.get("canary", "v2")),
                steps=steps,
            )
        gate = raw.get("gate") or {}
        return cls(
            canaries,
            Gate(
                window=str(gate.get("window", Gate.window)),
                min_requests=float(gate.get("min_requests", Gate.min_requests)),
                max_error_rate_increase=float(
                    gate.get("max_error_rate_increase", Gate.max_error_rate_increase)
                ),
                max_p99_ratio=float(gate.get("max_p99_ratio", Gate.max_p99_ratio)),
                p99_slack_seconds=float(gate.get("p99_slack_seconds", Gate.p99_slack_seconds)),
                queries=dict(gate.get("queries") or {}) or None,
            ),
        )

    def plan(self, service: str) -> CanaryPlan:
        try:
            return self.canaries[service]
        except KeyError:
            known = ", ".join(sorted(self.canaries)) or "none"
            raise EditError(f"no canary plan for {service!r} (plans: {known})") from None


def _yaml() -> YAML:
    yaml = YAML()  # round-trip
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap a long line
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def _documents(text: str) -> list[Any]:
    return list(_yaml().load_all(text))


def _virtualservice(documents: Sequence[Any], plan: CanaryPlan) -> Any:
    for doc in documents:
        if (
            isinstance(doc, Mapping)
            and doc.get("kind") == "VirtualService"
            and (doc.get("metadata") or {}).get("name") == plan.virtualservice
        ):
            return doc
    raise EditError(f"{plan.file}: no VirtualService {plan.virtualservice!r}")


def _split(vs: Any, plan: CanaryPlan) -> list[tuple[str, list[Any]]]:
    routes = split_routes(vs)
    if not routes:
        raise EditError(
            f"{plan.file}: VirtualService {plan.virtualservice} has no route split between"
            f" {plan.stable} and {plan.canary}"
        )
    for name, destinations in routes:
        subsets = sorted(str((d.get("destination") or {}).get("subset")) for d in destinations)
        if subsets != sorted(plan.subsets):
            raise EditError(
                f"{plan.file}: route {name!r} splits between {subsets}, not the plan's"
                f" {sorted(plan.subsets)}"
            )
    return routes


def read_weights(plan: CanaryPlan) -> dict[str, dict[str, int]]:
    """Each split route's weights, by subset, as they stand in the file."""
    vs = _virtualservice(_documents(plan.file.read_text()), plan)
    return {
        name: {str(d["destination"]["subset"]): int(d.get("weight") or 0) for d in destinations}
        for name, destinations in _split(vs, plan)
    }


def parse_assignments(plan: CanaryPlan, assignments: Sequence[str]) -> dict[str, int]:
    """`v2=10` (the other subset gets the rest) or `v1=90 v2=10` (they must sum to 100)."""
    weights: dict[str, int] = {}
    for item in assignments:
        subset, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise EditError(f"{item!r}: expected SUBSET=WEIGHT, such as {plan.canary}=10")
        subset = subset.strip()
        if subset not in plan.subsets:
            raise EditError(
                f"{subset!r} is not a subset of {plan.service}'s canary"
                f" (subsets: {', '.join(plan.subsets)})"
            )
        if subset in weights:
            raise EditError(f"{subset} is named twice")
        weight = int(value)
        if weight > 100:
            raise EditError(f"{subset}={weight}: a weight is at most 100")
        weights[subset] = weight
    if not weights:
        raise EditError(f"no weights given; for example: {plan.canary}=10")
    if len(weights) == 1:
        (named, weight), other = next(iter(weights.items())), None
        other = plan.canary if named == plan.stable else plan.stable
        weights[other] = 100 - weight
    total = sum(weights.values())
    if total != 100:
        shown = " ".join(f"{k}={v}" for k, v in weights.items())
        raise EditError(f"weights must sum to 100: {shown} sums to {total}")
    return {subset: weights[subset] for subset in plan.subsets}


def apply_weights(plan: CanaryPlan, weights: Mapping[str, int]) -> tuple[str, str]:
    """The file's text before and after setting `weights` on every split route. Only the
    weight values change: the documents are edited in place and dumped round-trip."""
    if sorted(weights) != sorted(plan.subsets) or sum(weights.values()) != 100:
        raise EditError(f"weights must name {plan.subsets} and sum to 100, not {dict(weights)}")
    before = plan.file.read_text()
    documents = _documents(before)
    vs = _virtualservice(documents, plan)
    for _, destinations in _split(vs, plan):
        for item in destinations:
            item["weight"] = weights[str(item["destination"]["subset"])]
    buffer = io.StringIO()
    _yaml().dump_all(documents, buffer)
    return before, buffer.getvalue()


def unified_diff(path: Path, before: str, after: str, root: Path) -> str:
    name = os.path.relpath(path, root)
    return "".join(
        difflib.unified_diff(
            before.splitlines(keepends=True),
            after.splitlines(keepends=True),
            f"a/{name}",
            f"b/{name}",
        )
    )


def write_atomically(path: Path, text: str) -> None:
    """Write beside the file, flush it to disk, then rename over it: a reader sees the old
    file or the new one, never a torn one. The file's mode is kept."""
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
