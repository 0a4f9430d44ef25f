"""Features metrics: events by outcome, batchGet latency and size, store errors and conflicts."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from narthex.common.metrics import LATENCY_BUCKETS

__all__ = ["FeatureMetrics"]

ENTITY_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
OUTCOMES = ("accepted", "duplicate", "stale", "refused")


class FeatureMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        events = Counter(
            "features_events",
            "Transaction events received, by outcome: accepted, duplicate (an event id"
            " already counted), stale (too old to count in any window), refused (in a"
            " batch refused as invalid).",
            ["outcome"],
            registry=registry,
        )
        # Children bound once: labels() on the hot path costs a lock each.
        self.events = {outcome: events.labels(outcome) for outcome in OUTCOMES}
        self.batch_get_seconds = Histogram(
            "features_batch_get_duration_seconds",
            "batchGet calls: from the validated request to the answer, store included.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_get_entities = Histogram(
            "features_batch_get_entities",
            "Entities asked for per batchGet call.",
            buckets=ENTITY_BUCKETS,
            registry=registry,
        )
        store_errors = Counter(
            "features_store_errors",
            "Store operations that failed (Redis unreachable, timed out, malformed data).",
            ["operation"],
            registry=registry,
        )
        self.store_errors = {op: store_errors.labels(op) for op in ("ingest", "batch_get")}
        self.store_conflicts = Counter(
            "features_store_conflicts",
            "Account writes applied again because another writer changed the account first.",
            registry=registry,
        )
