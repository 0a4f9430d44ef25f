"""Prometheus metrics: RED metrics for every HTTP route, one registry per app."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from narthex.common.breaker import CLOSED, HALF_OPEN, OPEN, AsyncCircuitBreaker

__all__ = [
    "CONTENT_TYPE_LATEST",
    "BreakerStates",
    "HttpMetrics",
    "generate_latest",
    "new_registry",
]

# Seconds. Dense where an edge proxy lives (sub-millisecond to tens of ms), sparse
# up to the slowest model call.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


def new_registry() -> CollectorRegistry:
    # Per app, not the process-global default: tests build many apps in one process.
    return CollectorRegistry(auto_describe=True)


class HttpMetrics:
    """Rate, errors and duration by method, route template and status."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.requests = Counter(
            "http_requests",
            "HTTP requests handled, by route template and status.",
            ["service", "method", "route", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "http_request_duration_seconds",
            "Time from request start to the last response byte.",
            ["service", "method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "http_requests_in_flight",
            "Requests being handled now.",
            ["service"],
            registry=registry,
        ).labels(service)
        self.service = service
        # labels() costs a dict lookup and a lock; the label space is small and bounded
        # (templates, not raw paths), so cache the children.
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(self.service, method, route, str(status)),
                self.duration.labels(self.service, method, route),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)


class BreakerStates(Collector):
    """Each breaker's state and consecutive failures, read when scraped (nothing on the
    request path): `upstream_breaker_state{upstream, state}` is 1 for the current state."""

    def __init__(self, breakers: Callable[[], Mapping[str, AsyncCircuitBreaker]]) -> None:
        self._breakers = breakers

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "upstream_breaker_state",
            "Circuit breaker to each upstream: 1 for its current state.",
            labels=["upstream", "state"],
        )
        failures = GaugeMetricFamily(
            "upstream_breaker_consecutive_failures",
            "Failures counted towards opening each upstream's breaker.",
            labels=["upstream"],
        )
        for name, breaker in sorted(self._breakers().items()):
            current = breaker.state
            for each in (CLOSED, HALF_OPEN, OPEN):
                state.add_metric([name, str(each)], 1.0 if current == each else 0.0)
            failures.add_metric([name], float(breaker.fail_counter))
        yield state
        yield failures
