"""Inference metrics: request, queue and compute time, batch sizes, queue depth, loads, provider.

Nothing is labelled by tenant: the queues are shared by any number of tenants, and a series
per tenant would grow without bound. Refusals are counted by reason, and the number of
tenants with queued work is a gauge; which tenant floods is for logs and dashboards' top-k
over the gateway's per-tenant usage, not for a label here.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from narthex.common.metrics import LATENCY_BUCKETS
from narthex.inference.batcher import FULL, PUSHED_OUT, BatchHooks

__all__ = ["InferenceMetrics", "VersionMetrics"]

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_LABELS = ["model", "version"]
REASONS = (FULL, PUSHED_OUT)


@dataclass(frozen=True, slots=True)
class VersionMetrics:
    """One version's children, bound once: labels() on the hot path costs a lock each."""

    requests_ok: Counter
    requests_failed: Counter
    items: Counter
    request_seconds: Histogram
    queue_seconds: Histogram
    compute_seconds: Histogram
    batch_size: Histogram
    queue_depth: Gauge
    queue_tenants: Gauge
    expired: Counter
    rejected: dict[str, Counter]  # by reason: FULL, PUSHED_OUT

    def hooks(self) -> BatchHooks:
        return BatchHooks(
            queued=self._queued,
            batch=self._batch,
            waited=self.queue_seconds.observe,
            expired=self.expired.inc,
            refused=self._refused,
        )

    def _queued(self, depth: int, tenants: int) -> None:
        self.queue_depth.set(depth)
        self.queue_tenants.set(tenants)

    def _refused(self, reason: str) -> None:
        self.rejected[reason].inc()

    def _batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.compute_seconds.observe(seconds)


class InferenceMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "inference_requests",
            "Inference requests by model version and outcome.",
            [*_LABELS, "outcome"],
            registry=registry,
        )
        self.items = Counter(
            "inference_items", "Items (rows, texts) computed.", _LABELS, registry=registry
        )
        self.request_seconds = Histogram(
            "inference_request_duration_seconds",
            "From a request's arrival in the batcher to its answer.",
            _LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_seconds = Histogram(
            "inference_queue_duration_seconds",
            "Time a chunk waited before its batch was formed.",
            _LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.compute_seconds = Histogram(
            "inference_compute_duration_seconds",
            "ONNX Runtime time per batch (with collation and splitting).",
            _LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "inference_batch_size",
            "Items per batch sent to the session.",
            _LABELS,
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "inference_queue_depth", "Items waiting for a batch.", _LABELS, registry=registry
        )
        self.expired = Counter(
            "inference_deadline_dropped",
            "Requests dropped before compute because their deadline had passed.",
            _LABELS,
            registry=registry,
        )
        self.queue_tenants = Gauge(
            "inference_queue_tenants",
            "Tenants with items waiting for a batch (they share the queue fairly).",
            _LABELS,
            registry=registry,
        )
        self.rejected = Counter(
            "inference_queue_rejected",
            "Requests refused with 503 by the queue: `full` (its tenant holds its share of a"
            " full queue), `pushed_out` (admitted, then pushed out for a tenant below its share).",
            [*_LABELS, "reason"],
            registry=registry,
        )
        self.load_seconds = Histogram(
            "inference_model_load_seconds",
            "Time to load and warm a model version.",
            _LABELS,
            buckets=LOAD_BUCKETS,
            registry=registry,
        )
        self.loaded = Gauge(
            "inference_model_loaded",
            "1 for each loaded version, labelled with the execution provider it really uses.",
            [*_LABELS, "provider"],
            registry=registry,
        )
        self.default_version = Gauge(
            "inference_default_version",
            "The version a request without a pin is served by when no split is set.",
            ["model"],
            registry=registry,
        )
        self.traffic_weight = Gauge(
            "inference_traffic_weight",
            "Percent of a model's unpinned requests each loaded version takes: its weight in"
            " the model's traffic split, or 100 for the default version when none is set.",
            _LABELS,
            registry=registry,
        )

    def version(self, model: str, version: int) -> VersionMetrics:
        labels = (model, str(version))
        return VersionMetrics(
            requests_ok=self.requests.labels(*labels, "ok"),
            requests_failed=self.requests.labels(*labels, "failed"),
            items=self.items.labels(*labels),
            request_seconds=self.request_seconds.labels(*labels),
            queue_seconds=self.queue_seconds.labels(*labels),
            compute_seconds=self.compute_seconds.labels(*labels),
            batch_size=self.batch_size.labels(*labels),
            queue_depth=self.queue_depth.labels(*labels),
            queue_tenants=self.queue_tenants.labels(*labels),
            expired=self.expired.labels(*labels),
            rejected={reason: self.rejected.labels(*labels, reason) for reason in REASONS},
        )
