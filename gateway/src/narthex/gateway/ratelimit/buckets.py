"""Per-tenant token bucket plus daily quota, decided atomically in Redis or in process memory."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, Literal, Protocol

from redis.exceptions import NoScriptError

__all__ = [
    "Commands",
    "Decision",
    "Limiter",
    "Limits",
    "MemoryLimiter",
    "Reason",
    "RedisLimiter",
]

Reason = Literal["ok", "rate", "quota", "too_large"]
_REASONS: dict[str, Reason] = {r: r for r in ("ok", "rate", "quota", "too_large")}

_DAY_S = 86400
# The Lua script's margin, so both backends forget an idle tenant's bucket alike.
_BUCKET_MARGIN_S = 1.0
# How often (clock seconds) the memory backend drops buckets and counters nobody needs.
_SWEEP_INTERVAL_S = 60.0


@dataclass(frozen=True, slots=True)
class Limits:
    """A tenant's plan as the limiter sees it."""

    rate: float  # tokens added per second
    burst: int  # bucket capacity, also the largest cost that can ever pass
    daily_quota: int  # items per UTC day

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate must be a positive finite number, not {self.rate!r}")
        if self.burst < 1:
            raise ValueError(f"burst must be at least 1, not {self.burst!r}")
        if self.daily_quota < 0:
            raise ValueError(f"daily_quota must not be negative, not {self.daily_quota!r}")


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one request, with the bucket and quota as they stand after it."""

    allowed: bool
    reason: Reason
    capacity: int
    remaining: float  # tokens left after this decision
    refill_rate: float
    seconds_until_full: float
    quota_limit: int
    quota_used: int
    quota_remaining: int
    quota_reset_seconds: float  # until the next UTC midnight
    # Until this same request could pass: "rate" until `cost` tokens are there, "quota"
    # until the day resets; 0 when allowed, and for "too_large", which never passes.
    retry_after: float


class Limiter(Protocol):
    async def acquire(self, tenant: str, limits: Limits, cost: int) -> Decision:
        """Admit `cost` items for `tenant` or refuse; a refusal consumes nothing."""
        ...

    async def peek(self, tenant: str, limits: Limits) -> Decision:
        """The current state; consumes nothing; allowed when a cost-1 request would pass."""
        ...


def _check_cost(cost: int) -> None:
    if cost < 1:
        raise ValueError(f"cost must be at least 1, not {cost!r}")


_SCRIPT = files("narthex.gateway.ratelimit").joinpath("buckets.lua").read_text(encoding="utf-8")
# Computed locally so the first call on a warm server is already a single EVALSHA.
_SCRIPT_SHA = hashlib.sha1(_SCRIPT.encode(), usedforsecurity=False).hexdigest()


class Commands(Protocol):
    """What the limiter needs of a Redis client: redis-py's, or the gateway's pipelined one."""

    async def execute_command(self, *args: Any) -> Any: ...


class RedisLimiter:
    """Limits shared by every replica: one Lua script, Redis server time, one round trip.

    Keys: `<prefix>:{<tenant>}:bucket` (hash; expires once it would be full again) and
    `<prefix>:{<tenant>}:quota:<YYYY-MM-DD>` (expires a little after that UTC day).
    `clock` (Unix seconds) replaces the server's time when given, so that tests drive
    time instead of waiting for it; every replica must then share that clock.
    Redis errors propagate; falling back is the caller's policy.
    """

    def __init__(
        self, redis: Commands, *, prefix: str, clock: Callable[[], float] | None = None
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._clock = clock

    async def acquire(self, tenant: str, limits: Limits, cost: int) -> Decision:
        _check_cost(cost)
        return await self._decide(tenant, limits, cost, consume=True)

    async def peek(self, tenant: str, limits: Limits) -> Decision:
        return await self._decide(tenant, limits, 1, consume=False)

    async def _decide(self, tenant: str, limits: Limits, cost: int, *, consume: bool) -> Decision:
        # The hash tag keeps both keys (and the dated one the script derives) in one slot.
        base = f"{self._prefix}:{{{tenant}}}"
        args: tuple[str | int, ...] = (
            f"{base}:bucket",
            f"{base}:quota:",
            repr(limits.rate),
            limits.burst,
            limits.daily_quota,
            cost,
            "1" if consume else "0",
        )
        if self._clock is not None:
            args += (repr(self._clock()),)
        try:
            reply = await self._redis.execute_command("EVALSHA", _SCRIPT_SHA, 2, *args)
        except NoScriptError:
            # A restarted or flushed server (or a cluster node new to this tenant's slot)
            # lacks the script: EVAL runs it and caches it there. Not SCRIPT LOAD, which
            # names no key, so a cluster client could not tell which node needs it.
            reply = await self._redis.execute_command("EVAL", _SCRIPT, 2, *args)
        return _parse(reply)


def _parse(reply: bytes | str) -> Decision:
    # The client may or may not decode replies; the script's answer is ASCII either way.
    text = reply.decode("ascii") if isinstance(reply, bytes) else reply
    (
        allowed,
        reason,
        capacity,
        remaining,
        refill_rate,
        until_full,
        quota_limit,
        quota_used,
        quota_remaining,
        quota_reset,
        retry_after,
    ) = text.split(" ")
    return Decision(
        allowed=allowed == "1",
        reason=_REASONS[reason],
        capacity=int(float(capacity)),
        remaining=float(remaining),
        refill_rate=float(refill_rate),
        seconds_until_full=float(until_full),
        quota_limit=int(float(quota_limit)),
        quota_used=int(float(quota_used)),
        quota_remaining=int(float(quota_remaining)),
        quota_reset_seconds=float(quota_reset),
        retry_after=float(retry_after),
    )


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float
    expires: float


@dataclass(slots=True)
class _DayCount:
    day: int
    used: int


class MemoryLimiter:
    """The Redis limiter's semantics for one process (single-process stack, Redis-down fallback).

    A decision never awaits, so on one event loop it is as atomic as the Lua script.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._counts: dict[str, _DayCount] = {}
        self._next_sweep = 0.0

    async def acquire(self, tenant: str, limits: Limits, cost: int) -> Decision:
        _check_cost(cost)
        return self._decide(tenant, limits, cost, consume=True)

    async def peek(self, tenant: str, limits: Limits) -> Decision:
        return self._decide(tenant, limits, 1, consume=False)

    def _decide(self, tenant: str, limits: Limits, cost: int, *, consume: bool) -> Decision:
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        rate, burst, quota = limits.rate, limits.burst, limits.daily_quota
        day = math.floor(now) // _DAY_S
        quota_reset = (day + 1) * _DAY_S - now

        count = self._counts.get(tenant)
        used = count.used if count is not None and count.day == day else 0

        tokens = float(burst)
        bucket = self._buckets.get(tenant)
        if bucket is not None and bucket.expires > now:
            # max(0, ...): a clock stepped back must not drain the bucket.
            tokens = min(burst, bucket.tokens + max(0.0, now - bucket.stamp) * rate)

        allowed, retry_after = False, 0.0
        reason: Reason = "ok"
        if cost > burst:
            reason = "too_large"
        elif used + cost > quota:
            reason, retry_after = "quota", quota_reset
        elif tokens < cost:
            reason, retry_after = "rate", (cost - tokens) / rate
        else:
            allowed = True

        if allowed and consume:
            tokens -= cost
            used += cost
            self._counts[tenant] = _DayCount(day, used)
            expires = now + math.ceil((burst - tokens) / rate * 1000) / 1000 + _BUCKET_MARGIN_S
            self._buckets[tenant] = _Bucket(tokens, now, expires)

        return Decision(
            allowed=allowed,
            reason=reason,
            capacity=burst,
            remaining=tokens,
            refill_rate=rate,
            seconds_until_full=(burst - tokens) / rate,
            quota_limit=quota,
            quota_used=used,
            quota_remaining=max(0, quota - used),
            quota_reset_seconds=quota_reset,
            retry_after=retry_after,
        )

    def _sweep(self, now: float) -> None:
        # What Redis does with TTLs: an idle tenant's full bucket and past days cost nothing.
        day = math.floor(now) // _DAY_S
        self._buckets = {t: b for t, b in self._buckets.items() if b.expires > now}
        self._counts = {t: c for t, c in self._counts.items() if c.day >= day}
        self._next_sweep = now + _SWEEP_INTERVAL_S
