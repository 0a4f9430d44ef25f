"""The SLA file (per endpoint: p95, p99, error rate, minimum throughput) and its verdict on a
Locust stats CSV: a table of every endpoint, then each breach by name."""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated

from pydantic import BaseModel, ConfigDict, Field

from narthex.loadtests.yamlfile import load_model

__all__ = [
    "LIMITED_SUFFIX",
    "Breach",
    "Endpoint",
    "Measured",
    "Sla",
    "SlaError",
    "Verdict",
    "judge",
    "load_sla",
    "read_stats",
]

# A 429 is reported under the request's name with this suffix: counted, never a failure,
# and kept out of the endpoint's own latencies (a refusal is fast and would flatter them).
LIMITED_SUFFIX = " [limited]"


class SlaError(Exception):
    """An SLA file or a stats file that cannot be judged: one line saying why."""


class Endpoint(BaseModel):
    """What one endpoint (a Locust request name) must meet over the whole run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    p95_ms: Annotated[float, Field(gt=0)]
    p99_ms: Annotated[float, Field(gt=0)]
    # Failed requests over all requests that were not refused with 429 (those are limited).
    error_rate: Annotated[float, Field(ge=0, le=1)]
    # Requests per second over the run, 429s not counted: 0 lets an endpoint go unused.
    min_rps: Annotated[float, Field(ge=0)] = 0.0


class Sla(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoints: Annotated[dict[str, Endpoint], Field(min_length=1)]


def load_sla(path: Path) -> Sla:
    return load_model(path, Sla, "SLA file", SlaError)


@dataclass(frozen=True)
class Measured:
    """One row of Locust's `<prefix>_stats.csv`."""

    name: str
    requests: int
    failures: int
    rps: float
    p95_ms: float | None  # None: no request, Locust writes N/A
    p99_ms: float | None

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


def _number(row: dict[str, str], column: str) -> float | None:
    value = row.get(column)
    if value is None:
        raise SlaError(f"the stats file has no column {column!r}: is it Locust's _stats.csv?")
    return None if value in ("", "N/A") else float(value)


def read_stats(path: Path) -> dict[str, Measured]:
    """Every named row (the Aggregated total left out), by Locust request name."""
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise SlaError(f"cannot read the stats file {path}: {exc.strerror}") from None
    measured: dict[str, Measured] = {}
    for row in rows:
        name, kind = row.get("Name", ""), row.get("Type", "")
        if not kind and name == "Aggregated":
            continue
        if name in measured:
            raise SlaError(f"the stats file names {name!r} twice: give each request its own name")
        measured[name] = Measured(
            name=name,
            requests=int(_number(row, "Request Count") or 0),
            failures=int(_number(row, "Failure Count") or 0),
            rps=_number(row, "Requests/s") or 0.0,
            p95_ms=_number(row, "95%"),
            p99_ms=_number(row, "99%"),
        )
    return measured


@dataclass(frozen=True)
class Breach:
    endpoint: str
    measure: str
    limit: str
    measured: str


@dataclass(frozen=True)
class Verdict:
    rows: list[list[str]]  # the table of every judged endpoint, header first
    breaches: list[Breach]

    @property
    def passed(self) -> bool:
        return not self.breaches


def _breaches(name: str, sla: Endpoint, seen: Measured | None) -> list[Breach]:
    if seen is None or seen.requests == 0:
        if sla.min_rps == 0:
            return []
        return [Breach(name, "requests", f">= {sla.min_rps:g}/s", "none made")]
    found: list[Breach] = []
    for measure, limit, value in (
        ("p95", sla.p95_ms, seen.p95_ms),
        ("p99", sla.p99_ms, seen.p99_ms),
    ):
        if value is not None and value > limit:
            found.append(Breach(name, measure, f"<= {limit:g} ms", f"{value:g} ms"))
    if seen.error_rate > sla.error_rate:
        found.append(
            Breach(
                name,
                "error rate",
                f"<= {sla.error_rate:.2%}",
                f"{seen.error_rate:.2%} ({seen.failures}/{seen.requests})",
            )
        )
    if seen.rps < sla.min_rps:
        found.append(Breach(name, "throughput", f">= {sla.min_rps:g}/s", f"{seen.rps:.2f}/s"))
    return found


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def judge(sla: Sla, stats: dict[str, Measured]) -> Verdict:
    """Each SLA endpoint against its row; endpoints the SLA does not name (a noisy
    neighbour's) are not judged."""
    header = ["ENDPOINT", "REQS", "LIMITED", "REQ/S", "P95 MS", "P99 MS", "ERRORS", "VERDICT"]
    rows = [header]
    breaches: list[Breach] = []
    for name, endpoint in sla.endpoints.items():
        seen = stats.get(name)
        limited = stats.get(name + LIMITED_SUFFIX)
        found = _breaches(name, endpoint, seen)
        breaches.extend(found)
        rows.append(
            [
                name,
                str(seen.requests if seen else 0),
                str(limited.requests if limited else 0),
                f"{seen.rps:.2f}" if seen else "0.00",
                _ms(seen.p95_ms if seen else None),
                _ms(seen.p99_ms if seen else None),
                f"{seen.error_rate:.2%}" if seen else "-",
                "BREACH" if found else "ok",
            ]
        )
    return Verdict(rows, breaches)


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def report(verdict: Verdict, sla_path: Path, out: IO[str]) -> None:
    """The table of endpoints, the breaches, and the verdict as the last line."""
    for line in table(verdict.rows):
        print(line, file=out)
    if verdict.breaches:
        print(file=out)
        rows = [["BREACHED", "MEASURE", "SLA", "MEASURED"]] + [
            [b.endpoint, b.measure, b.limit, b.measured] for b in verdict.breaches
        ]
        for line in table(rows):
            print(line, file=out)
        names = ", ".join(sorted({b.endpoint for b in verdict.breaches}))
        print(
            f"SLA FAILED ({sla_path}): {len(verdict.breaches)} breach(es) on {names}",
            file=out,
            flush=True,
        )
    else:
        print(
            f"SLA PASSED ({sla_path}): {len(verdict.rows) - 1} endpoint(s) within their limits",
            file=out,
            flush=True,
        )


def check(stats_path: Path, sla_path: Path, out: IO[str]) -> int:
    """0 when every endpoint meets its SLA, 1 naming each breach, 2 when it cannot judge."""
    try:
        verdict = judge(load_sla(sla_path), read_stats(stats_path))
    except SlaError as exc:
        print(f"SLA not judged: {exc}", file=out, flush=True)
        return 2
    report(verdict, sla_path, out)
    return 0 if verdict.passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m narthex.loadtests.sla",
        description="Judge a Locust stats CSV (<prefix>_stats.csv) against an SLA file.",
    )
    parser.add_argument("stats", type=Path, help="Locust's <prefix>_stats.csv")
    parser.add_argument("sla", type=Path, help="the SLA file (YAML)")
    args = parser.parse_args(argv)
    return check(args.stats, args.sla, sys.stdout)


if __name__ == "__main__":
    raise SystemExit(main())
