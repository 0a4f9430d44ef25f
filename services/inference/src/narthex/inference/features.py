"""Account aggregates from the features service: one call per batch, within a time budget.

A formed batch may hold several tenants' transactions: each account is asked for with its
own tenant, and the call carries inference's own service credential, never a caller's
token (which speaks for one tenant only).

A fraud score must not wait on, or fail with, the features service: a lookup that does
not answer within `budget` seconds, errors, finds the breaker open, or has no credential
to call with gives the declared defaults (`narthex.transactions.DEFAULTS`, what an
unknown account looks like) and says so, and the prediction is marked `degraded`. Never
a 5xx for that reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram

from narthex.common.credential import CredentialUnavailable, ServiceCredential
from narthex.common.http import CircuitOpen, ServiceClient, UpstreamTimeout, UpstreamUnavailable
from narthex.common.metrics import LATENCY_BUCKETS
from narthex.transactions import DEFAULTS
from narthex.transactions.lookup import BATCH_GET, EntityId, decode_answer, encode_request

__all__ = ["FeatureClient", "FeatureMetrics", "Lookup"]

log = structlog.get_logger("narthex.inference.features")


class _Refused(Exception):
    """features refused the credential (401/403)."""


@dataclass(frozen=True, slots=True)
class Lookup:
    """Aggregates per entity, in the order asked; `degraded` when they are the defaults
    because the features service could not give them (`reason` says why)."""

    values: list[dict[str, float]]
    degraded: bool
    reason: str | None = None

    @classmethod
    def defaults(cls, count: int, reason: str) -> Lookup:
        """The declared defaults for `count` entities, degraded for `reason`."""
        return cls([dict(DEFAULTS) for _ in range(count)], degraded=True, reason=reason)


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
    """`credential`: inference's own (None: not configured, every lookup degrades). At most
    half the budget is spent waiting for a token (only when none is held); the call to
    features gets what is left."""

    def __init__(
        self,
        client: ServiceClient,
        credential: ServiceCredential | None,
        *,
        budget: float,
        metrics: FeatureMetrics,
    ) -> None:
        self.client = client
        self.credential = credential
        self.budget = budget
        self.metrics = metrics

    async def lookup(self, entities: Sequence[EntityId], *, at: float) -> Lookup:
        """Each (tenant, account)'s aggregates at `at`, in the order given."""
        started = time.monotonic()
        try:
            values = await self._fetch(entities, at, started)
        except (CredentialUnavailable, TimeoutError):
            return self._degraded(entities, "no_credential")
        except _Refused:
            return self._degraded(entities, "refused")
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
        self, entities: Sequence[EntityId], at: float, started: float
    ) -> list[dict[str, float]]:
        if self.credential is None:
            raise CredentialUnavailable("no service key configured")
        async with asyncio.timeout(self.budget / 2):
            token = await self.credential.token()
        response = await self.client.post(
            BATCH_GET,
            content=encode_request(dict.fromkeys(entities), at),
            headers={"content-type": "application/json", "authorization": f"Bearer {token}"},
            deadline=self.budget - (time.monotonic() - started),
            idempotent=True,  # a read: safe to try again within the budget
        )
        if response.status_code in (401, 403):
            # Revoked, expired early, or signed by a retired key: the next batch gets a
            # new token rather than the same refusal.
            self.credential.invalidate(token)
            log.warning("features refused inference's credential", status=response.status_code)
            raise _Refused()
        if response.status_code != 200:
            raise ValueError(f"batchGet answered {response.status_code}")
        by_entity = decode_answer(response.content)
        return [by_entity[entity] for entity in entities]

    def _degraded(self, entities: Sequence[EntityId], reason: str) -> Lookup:
        self.metrics.fallbacks.labels(reason).inc()
        return Lookup.defaults(len(entities), reason)
