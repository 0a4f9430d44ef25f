"""slowapi's per-client-IP guard on the unauthenticated routes; not the tenant limiter."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from ipaddress import IPv6Address, IPv6Network
from typing import Any

import structlog
from limits import RateLimitItem, parse_many
from limits.errors import StorageError
from redis.exceptions import RedisError
from slowapi import Limiter
from starlette.requests import Request
from starlette.types import Scope

from narthex.gateway.clientip import Network, client_ip, parse_address
from narthex.gateway.errors import RateLimited

log = structlog.get_logger("narthex.gateway.ratelimit.guard")

# The moving window counts the last minute exactly; a fixed window would let a client
# spend two windows' worth in the seconds around a boundary.
STRATEGY = "moving-window"
IPV6_CLIENT_PREFIX = 64


def parse_limit(text: str) -> RateLimitItem:
    """One limit in slowapi's notation ("30/minute", "5 per 10 seconds")."""
    items = parse_many(text)
    if len(items) != 1:
        raise ValueError(f"expected exactly one limit, got {text!r}")
    return items[0]


def guard_key(client: str) -> str:
    """What one client is counted under: its IPv4 address, or its IPv6 /64.

    One subscriber is given a whole /64 (RFC 6177), so counting IPv6 addresses one by
    one would give a single client 2^64 separate allowances.
    """
    address = parse_address(client)
    if address is None:
        return client
    if isinstance(address, IPv6Address):
        return str(IPv6Network((address, IPV6_CLIENT_PREFIX), strict=False))
    return str(address)


class ClientGuard:
    """Counts requests to a guarded route per client (`client_ip`, by `guard_key`) and
    refuses the ones over `limit` with a 429 `rate-limited` problem and `Retry-After`.

    With `storage_uri` (Redis) the count is shared by the replicas; when Redis fails, a
    per-replica memory count at the same limit stands in, and Redis is tried again after
    `retry_seconds`. Without it, the count is this process's own.
    """

    def __init__(
        self,
        limit: str,
        *,
        trusted: Sequence[Network] = (),
        storage_uri: str | None = None,
        prefix: str = "narthex:gw:guard",
        retry_seconds: float = 2.0,
    ) -> None:
        self.item = parse_limit(limit)
        self.trusted = tuple(trusted)
        self.retry_seconds = retry_seconds
        self.shared = storage_uri is not None
        # Short timeouts: a Redis that does not answer is treated as down fast, and
        # wrapped errors are one exception type to catch whatever the driver raises.
        options: dict[str, Any] = (
            {
                "key_prefix": prefix,
                "wrap_exceptions": True,
                "socket_timeout": 0.5,
                "socket_connect_timeout": 0.5,
            }
            if storage_uri
            else {}
        )
        # The key function is what a FastAPI route's `@guard.limiter.limit(...)` would use.
        self.limiter = Limiter(
            key_func=self.key,
            strategy=STRATEGY,
            storage_uri=storage_uri or "memory://",
            storage_options=options,
        )
        self.local = (
            Limiter(key_func=self.key, strategy=STRATEGY, storage_uri="memory://")
            if self.shared
            else self.limiter
        )
        self._down_until = 0.0

    def key(self, request: Request) -> str:
        return guard_key(client_ip(request.scope, self.trusted))

    async def check(self, scope: Scope, name: str) -> None:
        """Count one request to `name` from the scope's client, or raise `RateLimited`."""
        address = guard_key(client_ip(scope, self.trusted))
        if self.shared and time.monotonic() >= self._down_until:
            try:
                # limits' Redis storage is synchronous: off the event loop with it.
                allowed, reset = await asyncio.to_thread(self._hit, self.limiter, name, address)
            except (StorageError, RedisError, OSError) as exc:
                self._down_until = time.monotonic() + self.retry_seconds
                log.warning("shared client guard unavailable", error=repr(exc))
            else:
                self._refuse_unless(allowed, reset)
                return
        self._refuse_unless(*self._hit(self.local, name, address))

    def _hit(self, limiter: Limiter, name: str, address: str) -> tuple[bool, float]:
        strategy = limiter.limiter
        if strategy.hit(self.item, name, address):
            return True, 0.0
        return False, strategy.get_window_stats(self.item, name, address).reset_time

    def _refuse_unless(self, allowed: bool, reset: float) -> None:
        if allowed:
            return
        wait = max(1, math.ceil(reset - time.time()))
        raise RateLimited(
            f"too many requests from this address: at most {self.item}; wait {wait} s",
            headers={"Retry-After": str(wait)},
        )
