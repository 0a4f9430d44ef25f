"""The analytics service's own metrics (names agreed with the dashboards and alerts)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class ConsumerMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.lag = Gauge(
            "analytics_stream_lag",
            "Stream entries (each a producer's batch of events) not yet acknowledged by the"
            " group: undelivered + pending.",
            ["stream"],
            registry=registry,
        )
        self.applied = Counter(
            "analytics_events_applied",
            "Events counted into the aggregates.",
            ["stream"],
            registry=registry,
        )
        self.duplicate = Counter(
            "analytics_events_duplicate",
            "Events delivered again and recognised by id (counted once).",
            ["stream"],
            registry=registry,
        )
        self.invalid = Counter(
            "analytics_events_invalid",
            "Events (or whole entries) that cannot be read (acknowledged, not counted).",
            ["stream"],
            registry=registry,
        )
        self.claimed = Counter(
            "analytics_events_claimed",
            "Pending entries taken over from a consumer that stopped answering.",
            ["stream"],
            registry=registry,
        )


class DriftMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.psi = Gauge(
            "analytics_drift_psi",
            "Population stability index of a model version's scores vs its baseline.",
            ["model", "version"],
            registry=registry,
        )
        self.flagged = Gauge(
            "analytics_drift_flagged",
            "1 when the version's PSI is above the threshold.",
            ["model", "version"],
            registry=registry,
        )
