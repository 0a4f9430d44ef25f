"""Account aggregates from the features service: one call per batch, within a time budget.

A fraud score must not wait on, or fail with, the features service: a lookup that does
not answer within `budget` seconds, errors, or finds the breaker open gives the declared
defaults (`narthex.transactions.DEFAULTS`, what an unknown account looks like) and says
so, and the prediction is marked `degraded`. Never a 5xx for that reason.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram

from narthex.common.http import CircuitOpen, ServiceClient, UpstreamTimeout, UpstreamUnavailable
from narthex.common.metrics import LATENCY_BUCKETS
from narthex.transactions import DEFAULTS, FEATURES

__all__ = ["BATCH_GET", "FeatureClient", "FeatureMetrics", "Lookup"]

log = structlog.get_logger("narthex.inference.features")

BATCH_GET = "/internal/v1/features:batchGet"


@dataclass(frozen=True, slots=True)
class Lookup:
    """Aggregates per entity, in the order asked; `degraded` when they are the defaults
    because the features service could not give them (`reason` says why)."""

    values: list[dict[str, float]]
    degraded: bool
    reason: str | None = None


class FeatureMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.seconds = Histogram(
            "inference_feature_lookup_seconds",
            "batchGet calls to the features service, one per formed batch.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.fallbacks = Counter(
            "inference_feature_fallbacks",
            "Batches scored on default features (degraded), by reason.",
            ["reason"],
            registry=registry,
        )


class FeatureClient:
    def __init__(self, client: ServiceClient, *, budget: float, metrics: FeatureMetrics) -> None:
        self.client = client
        self.budget = budget
        self.metrics = metrics

    async def lookup(self, entities: Sequence[str], *, at: float, token: str | None) -> Lookup:
        started = time.monotonic()
        try:
            values = await self._fetch(entities, at, token)
        except CircuitOpen:
            return self._degraded(entities, "breaker_open")
        except UpstreamTimeout:
            return self._degraded(entities, "timeout")
        except UpstreamUnavailable:
            return self._degraded(entities, "unavailable")
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            log.warning("feature lookup failed", error=f"{type(exc).__name__}: {exc}")
            return self._degraded(entities, "bad_answer")
        finally:
            self.metrics.seconds.observe(time.monotonic() - started)
        return Lookup(values, degraded=False)

    async def _fetch(
        self, entities: Sequence[str], at: float, token: str | None
    ) -> list[dict[str, float]]:
        unique = list(dict.fromkeys(entities))
        headers = {"content-type": "application/json"}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        response = await self.client.post(
            BATCH_GET,
            content=orjson.dumps({"entities": unique, "at": at}),
            headers=headers,
            deadline=self.budget,
            idempotent=True,  # a read: safe to try again within the budget
        )
        if response.status_code != 200:
            raise ValueError(f"batchGet answered {response.status_code}")
        body: Any = orjson.loads(response.content)
        by_entity = {
            item["entity"]: {name: float(item["values"][name]) for name in FEATURES}
            for item in body["features"]
        }
        return [by_entity[entity] for entity in entities]

    def _degraded(self, entities: Sequence[str], reason: str) -> Lookup:
        self.metrics.fallbacks.labels(reason).inc()
        return Lookup([dict(DEFAULTS) for _ in entities], degraded=True, reason=reason)
