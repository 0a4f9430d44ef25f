"""Usage reports from the hourly rows, and drift of each model version's scores (no FastAPI)."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson
import structlog

from narthex.analytics.errors import BadRange
from narthex.analytics.metrics import DriftMetrics
from narthex.analytics.models import LATENCY_BOUNDS_MS, LATENCY_COLUMNS, SCORE_BINS
from narthex.analytics.store import AnalyticsStore

log = structlog.get_logger("narthex.analytics.service")

Granularity = Literal["hour", "day"]
HOUR = 3600
DAY = 86_400
STEP = {"hour": HOUR, "day": DAY}
# Hourly series longer than this are refused: ask for days.
MAX_HOURLY_POINTS = 24 * 31
QUANTILES = {"p50": 0.50, "p95": 0.95, "p99": 0.99}
# A bin with no score on one side would make PSI infinite; both sides are floored here.
PSI_FLOOR = 1e-4


@dataclass
class Tally:
    """Counters of any set of hourly rows; adding is all there is (buckets merge)."""

    requests: int = 0
    items: int = 0
    limited: int = 0
    latency_ms_sum: float = 0.0
    statuses: Counter[int] = field(default_factory=Counter)
    latency: list[int] = field(default_factory=lambda: [0] * len(LATENCY_COLUMNS))

    def add(self, row: Mapping[str, Any]) -> None:
        self.requests += row["requests"]
        self.items += row["items"]
        self.limited += row["limited"]
        self.latency_ms_sum += row["latency_ms_sum"]
        self.statuses[row["status"]] += row["requests"]
        for i, name in enumerate(LATENCY_COLUMNS):
            self.latency[i] += row[name]

    def quantile(self, q: float) -> float | None:
        """The upper bound of the bucket holding the q-quantile (exact to the bucket); the
        last finite bound for the overflow bucket; None without requests."""
        total = sum(self.latency)
        if not total:
            return None
        rank = math.ceil(q * total)
        seen = 0
        for bound, count in zip(LATENCY_BOUNDS_MS, self.latency, strict=True):
            seen += count
            if seen >= rank:
                return bound if math.isfinite(bound) else LATENCY_BOUNDS_MS[-2]
        return LATENCY_BOUNDS_MS[-2]

    def report(self) -> dict[str, Any]:
        statuses = self.statuses
        return {
            "requests": self.requests,
            "items": self.items,
            "errors": sum(n for s, n in statuses.items() if s >= 500),
            "client_errors": sum(n for s, n in statuses.items() if 400 <= s < 500 and s != 429),
            "rate_limited": statuses[429],
            "statuses": {str(s): n for s, n in sorted(statuses.items()) if n},
            "latency_ms": {
                "mean": round(self.latency_ms_sum / self.requests, 3) if self.requests else None,
                **{name: self.quantile(q) for name, q in QUANTILES.items()},
                "buckets": [
                    {"le": bound if math.isfinite(bound) else None, "count": count}
                    for bound, count in zip(LATENCY_BOUNDS_MS, self.latency, strict=True)
                ],
            },
        }


@dataclass(frozen=True, slots=True)
class Range:
    start: int  # epoch seconds, aligned to the granularity, inclusive
    end: int  # exclusive
    granularity: Granularity


def usage_range(
    start: datetime | None,
    end: datetime | None,
    granularity: Granularity,
    *,
    now: float,
    max_days: int,
) -> Range:
    """The periods a query covers: `from` rounded down, `to` up, to whole periods."""
    step = STEP[granularity]
    end_s = _epoch(end) if end is not None else now
    start_s = (
        _epoch(start) if start is not None else end_s - (DAY if granularity == "hour" else 7 * DAY)
    )
    if start_s >= end_s:
        raise BadRange("`from` must be before `to`")
    if start_s < 0:
        raise BadRange("`from` is before 1970")
    if end_s - start_s > max_days * DAY:
        raise BadRange(f"a range covers at most {max_days} days")
    aligned_start = int(start_s) // step * step
    aligned_end = -(-math.ceil(end_s) // step) * step
    if granularity == "hour" and (aligned_end - aligned_start) // HOUR > MAX_HOURLY_POINTS:
        raise BadRange(
            f"hourly series cover at most {MAX_HOURLY_POINTS // 24} days; use granularity=day"
        )
    return Range(aligned_start, aligned_end, granularity)


def _epoch(value: datetime) -> float:
    if value.tzinfo is None:  # a time without an offset is taken as UTC
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def usage_report(
    rows: Iterable[Mapping[str, Any]], period: Range, tenant: str | None
) -> dict[str, Any]:
    step = STEP[period.granularity]
    totals = Tally()
    series = {start: Tally() for start in range(period.start, period.end, step)}
    by_key: dict[str, Tally] = {}
    by_model: dict[tuple[str, str], Tally] = {}
    by_route: dict[str, Tally] = {}
    by_tenant: dict[str, Tally] = {}
    for row in rows:
        totals.add(row)
        series[row["hour"] // step * step].add(row)
        by_key.setdefault(row["key_id"], Tally()).add(row)
        by_route.setdefault(row["route"], Tally()).add(row)
        if row["model"]:
            by_model.setdefault((row["model"], row["version"]), Tally()).add(row)
        if tenant is None:
            by_tenant.setdefault(row["tenant"], Tally()).add(row)
    report: dict[str, Any] = {
        "tenant": tenant,
        "granularity": period.granularity,
        "from": _iso(period.start),
        "to": _iso(period.end),
        "totals": totals.report(),
        "series": [{"start": _iso(s), **t.report()} for s, t in series.items()],
        "by_key": [{"key_id": k or None, **t.report()} for k, t in sorted(by_key.items())],
        "by_model": [
            {"model": m, "version": v or None, **t.report()}
            for (m, v), t in sorted(by_model.items())
        ],
        "by_route": [{"route": r, **t.report()} for r, t in sorted(by_route.items())],
    }
    if tenant is None:
        report["by_tenant"] = [{"tenant": k, **t.report()} for k, t in sorted(by_tenant.items())]
    # The series' latency buckets would make a long range heavy; their quantiles stay.
    for point in report["series"]:
        point["latency_ms"].pop("buckets")
    return report


# -- drift ----------------------------------------------------------------------------------


def psi(expected: list[float], counts: list[int]) -> float:
    """Population stability index: sum over bins of (a - e) ln(a / e), fractions floored."""
    total = sum(counts)
    value = 0.0
    for e, count in zip(expected, counts, strict=True):
        a = max(count / total, PSI_FLOOR)
        e = max(e, PSI_FLOOR)
        value += (a - e) * math.log(a / e)
    return value


def baseline_of(repository: Path, model: str, version: str) -> list[float] | None:
    """The version's `score_baseline` fractions, if it has one in the layout events use."""
    if not (model.replace("-", "").replace("_", "").isalnum() and version.isdigit()):
        return None  # names from events never become arbitrary paths
    path = repository / model / version / "metadata.json"
    try:
        baseline = orjson.loads(path.read_bytes()).get("score_baseline")
    except (OSError, orjson.JSONDecodeError, AttributeError):
        return None
    if not isinstance(baseline, dict):
        return None
    edges, fractions = baseline.get("edges"), baseline.get("fractions")
    equal_bins = [i / SCORE_BINS for i in range(SCORE_BINS + 1)]
    if (
        not isinstance(edges, list)
        or not isinstance(fractions, list)
        or len(fractions) != SCORE_BINS
        or len(edges) != SCORE_BINS + 1
        or any(abs(float(a) - b) > 1e-9 for a, b in zip(edges, equal_bins, strict=True))
    ):
        return None
    return [float(f) for f in fractions]


class AnalyticsService:
    def __init__(
        self,
        store: AnalyticsStore,
        *,
        repository: Path,
        drift_window_hours: int,
        drift_threshold: float,
        drift_metrics: DriftMetrics,
        max_range_days: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.repository = repository
        self.drift_window_hours = drift_window_hours
        self.drift_threshold = drift_threshold
        self.drift_metrics = drift_metrics
        self.max_range_days = max_range_days
        self.clock = clock

    async def usage(
        self,
        tenant: str | None,
        start: datetime | None,
        end: datetime | None,
        granularity: Granularity,
    ) -> dict[str, Any]:
        period = usage_range(
            start, end, granularity, now=self.clock(), max_days=self.max_range_days
        )
        rows = await self.store.usage_rows(tenant, period.start, period.end)
        return usage_report(rows, period, tenant)

    async def drift(self, tenant: str | None = None) -> dict[str, Any]:
        """PSI per model version over the window: of every tenant's predictions together
        (and then the gauges are set), or of one tenant's."""
        now = self.clock()
        since = int(now) // HOUR * HOUR - (self.drift_window_hours - 1) * HOUR
        counts = await self.store.score_counts(since, tenant)
        versions = []
        for (model, version), bins in sorted(counts.items()):
            baseline = baseline_of(self.repository, model, version)
            total = sum(bins)
            value = psi(baseline, bins) if baseline is not None and total else None
            flagged = value is not None and value > self.drift_threshold
            versions.append(
                {
                    "model": model,
                    "version": version,
                    "predictions": total,
                    "psi": None if value is None else round(value, 6),
                    "flagged": flagged,
                    "baseline": baseline is not None,
                    "score_counts": bins,
                    "baseline_fractions": baseline,
                }
            )
            if value is not None and tenant is None:
                self.drift_metrics.psi.labels(model, version).set(value)
                self.drift_metrics.flagged.labels(model, version).set(1.0 if flagged else 0.0)
        return {
            "tenant": tenant,
            "window_hours": self.drift_window_hours,
            "since": _iso(since),
            "threshold": self.drift_threshold,
            "versions": versions,
        }

    async def forget_old_ids(self, retention_days: float) -> int:
        return await self.store.forget_before(self.clock() - retention_days * DAY)


__all__ = ["AnalyticsService", "Range", "Tally", "psi", "usage_range"]
