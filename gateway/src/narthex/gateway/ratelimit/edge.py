"""Rate limits at the edge: what a request costs, the decision, RateLimit headers, 429s."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Literal

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.exceptions import RedisError

from narthex.common.errors import Problem, ServiceUnavailable
from narthex.common.plans import TenantLimits
from narthex.gateway.errors import QuotaExceeded, RateLimited, TooManyItems
from narthex.gateway.ratelimit.buckets import Decision, Limiter, Limits, MemoryLimiter

log = structlog.get_logger("narthex.gateway.ratelimit.edge")

FailureMode = Literal["open", "closed"]
DAY = 86_400


def rate_limit_headers(decision: Decision) -> list[tuple[bytes, bytes]]:
    """`RateLimit-Policy` and `RateLimit` (IETF httpapi draft structured fields): one
    item for the bucket and one for the day, delta seconds, never an epoch."""
    window = math.ceil(decision.capacity / decision.refill_rate)
    policy = b'"burst";q=%d;w=%d, "daily";q=%d;w=%d' % (
        decision.capacity,
        max(1, window),
        decision.quota_limit,
        DAY,
    )
    state = b'"burst";r=%d;t=%d, "daily";r=%d;t=%d' % (
        max(0, math.floor(decision.remaining)),
        math.ceil(decision.seconds_until_full),
        max(0, decision.quota_remaining),
        math.ceil(decision.quota_reset_seconds),
    )
    return [(b"ratelimit-policy", policy), (b"ratelimit", state)]


def refusal(decision: Decision, cost: int) -> Problem:
    headers = {k.decode(): v.decode() for k, v in rate_limit_headers(decision)}
    if decision.reason == "too_large":
        return TooManyItems(
            f"the request carries {cost} items; the plan's burst is {decision.capacity},"
            " so it can never be admitted: send fewer items per request",
            headers=headers,
        )
    headers["Retry-After"] = str(max(1, math.ceil(decision.retry_after)))
    if decision.reason == "quota":
        return QuotaExceeded(
            f"the daily quota of {decision.quota_limit} items is used up until UTC midnight",
            headers=headers,
        )
    return RateLimited(f"wait {headers['Retry-After']} s before retrying", headers=headers)


class LimiterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "ratelimit_decisions",
            "Rate-limit decisions, by result and backend.",
            ["result", "backend"],
            registry=registry,
        )
        self.backend_errors = Counter(
            "ratelimit_backend_errors", "Failed calls to the shared limiter.", registry=registry
        )
        self.fallback = Gauge(
            "ratelimit_fallback_active",
            "1 while the per-replica memory limiter stands in for the shared one.",
            registry=registry,
        )
        # By tenant: the dashboards' top-k and per-tenant 429s. One series per tenant and
        # result, bounded by the tenants the operator creates (never by what a client sends:
        # the tenant comes from a verified credential).
        self.tenant_decisions = Counter(
            "ratelimit_tenant_decisions",
            "Rate-limit decisions by tenant and result.",
            ["tenant", "result"],
            registry=registry,
        )
        self.tenant_quota_used = Gauge(
            "ratelimit_tenant_quota_used_ratio",
            "The share of its daily quota a tenant has used, as of its last request here.",
            ["tenant"],
            registry=registry,
        )
        # labels() takes a lock and builds a key, ~6 us a call, three a request: the
        # children are kept, as bounded as the series themselves.
        self._decided: dict[tuple[str, str, str], tuple[Counter, Counter]] = {}
        self._quota_used: dict[str, Gauge] = {}

    def decided(self, tenant: str, result: str, backend: str) -> tuple[Counter, Counter]:
        """The `decisions` and `tenant_decisions` series of one decision."""
        key = (tenant, result, backend)
        children = self._decided.get(key)
        if children is None:
            children = (
                self.decisions.labels(result, backend),
                self.tenant_decisions.labels(tenant, result),
            )
            self._decided[key] = children
        return children

    def quota_used(self, tenant: str) -> Gauge:
        gauge = self._quota_used.get(tenant)
        if gauge is None:
            gauge = self._quota_used[tenant] = self.tenant_quota_used.labels(tenant)
        return gauge


class EdgeLimiter:
    """The shared limiter when it answers; the failure policy when it does not.

    `open`: a per-replica memory bucket at the plan's rate and daily quota divided by
    the replica count, so that over time the replicas together admit no more than the
    plan. Each keeps the full burst (dividing it would refuse mid-sized requests as
    "can never pass" during an outage), so right after a failure up to replicas x burst
    can pass at once. `closed`: 503 with Retry-After. Either way the shared limiter is
    tried again every `retry_seconds`, so it resumes by itself when Redis is back.
    `clock` (Unix seconds, the memory bucket's) and `monotonic` (the retry's) are seams
    for tests that drive time.
    """

    def __init__(
        self,
        shared: Limiter | None,
        metrics: LimiterMetrics,
        *,
        failure_mode: FailureMode = "open",
        replicas: int = 1,
        retry_seconds: float = 2.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.shared = shared
        self.metrics = metrics
        self.failure_mode = failure_mode
        self.replicas = max(1, replicas)
        self.retry_seconds = retry_seconds
        self.local = MemoryLimiter(clock=clock)
        self._monotonic = monotonic
        self._down_until = 0.0

    @property
    def using_fallback(self) -> bool:
        return self.shared is not None and self._monotonic() < self._down_until

    def _local_limits(self, plan: TenantLimits) -> Limits:
        if self.shared is None:  # a single-process stack: memory is the real limiter
            return Limits(plan.rate_per_second, plan.burst, plan.daily_quota)
        return Limits(
            plan.rate_per_second / self.replicas,
            plan.burst,
            max(1, plan.daily_quota // self.replicas),
        )

    async def acquire(self, plan: TenantLimits, cost: int) -> Decision:
        return await self._decide(plan, cost)

    async def peek(self, plan: TenantLimits) -> Decision:
        return await self._decide(plan, None)

    async def _decide(self, plan: TenantLimits, cost: int | None) -> Decision:
        limits = Limits(plan.rate_per_second, plan.burst, plan.daily_quota)
        if self.shared is not None and self._monotonic() >= self._down_until:
            try:
                decision = await (
                    self.shared.peek(plan.tenant, limits)
                    if cost is None
                    else self.shared.acquire(plan.tenant, limits, cost)
                )
            except (RedisError, OSError, TimeoutError) as exc:
                self._down_until = self._monotonic() + self.retry_seconds
                self.metrics.backend_errors.inc()
                self.metrics.fallback.set(1)
                # Not repr(): redis-py's exceptions leave their message out of it.
                log.warning(
                    "shared rate limiter unavailable",
                    error=f"{type(exc).__name__}: {exc}",
                    mode=self.failure_mode,
                )
            else:
                self.metrics.fallback.set(0)
                self._count(plan.tenant, decision, cost, "shared")
                return decision
        if self.shared is not None and self.failure_mode == "closed":
            raise ServiceUnavailable(
                "rate limiting is unavailable",
                headers={"Retry-After": str(math.ceil(self.retry_seconds))},
            )
        local = self._local_limits(plan)
        decision = await (
            self.local.peek(plan.tenant, local)
            if cost is None
            else self.local.acquire(plan.tenant, local, cost)
        )
        self._count(plan.tenant, decision, cost, "memory")
        return decision

    def _count(self, tenant: str, decision: Decision, cost: int | None, backend: str) -> None:
        if cost is not None:
            decisions, tenant_decisions = self.metrics.decided(tenant, decision.reason, backend)
            decisions.inc()
            tenant_decisions.inc()
            if decision.quota_limit > 0:
                self.metrics.quota_used(tenant).set(
                    min(1.0, decision.quota_used / decision.quota_limit)
                )
