"""The verification keys of a JWKS endpoint: what a usable key is, and the cache every request
shares (fetched lazily, refreshed in the background, never a fetch storm)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric import rsa

from narthex.common.deadline import unbounded_context
from narthex.common.errors import ServiceUnavailable

__all__ = [
    "ALGORITHM",
    "MIN_RSA_BITS",
    "JwksCache",
    "JwksUnavailable",
    "b64url",
    "b64url_decode",
    "b64url_uint",
    "thumbprint",
]

log = structlog.get_logger("narthex.jwks")

# What narthex signs with and accepts: RS256, with keys of at least this many bits.
ALGORITHM = "RS256"
MIN_RSA_BITS = 2048


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_uint(value: int) -> str:
    return b64url(value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def thumbprint(n: str, e: str) -> str:
    # RFC 7638: the required members only, sorted, no whitespace.
    canonical = json.dumps({"e": e, "kty": "RSA", "n": n}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode("ascii")).digest())


class JwksUnavailable(ServiceUnavailable):
    """No signing keys to check tokens with: the caller's token may be fine, so 503, not 401."""

    type_slug, title = "jwks-unavailable", "Token signing keys unavailable"

    def __init__(self, retry_after: int = 5) -> None:
        super().__init__(
            "The keys that verify access tokens cannot be loaded right now.",
            headers={"Retry-After": str(max(1, retry_after))},
        )
        self.retry_after = max(1, retry_after)


def _usable_keys(document: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """kid -> JWK for the RS256 signing keys of a JWKS document; ValueError if there are none."""
    entries = document.get("keys") if isinstance(document, Mapping) else None
    if not isinstance(entries, list):
        raise ValueError("JWKS document has no 'keys' list")
    keys: dict[str, dict[str, Any]] = {}
    for entry in entries:
        # Anything that is not an RS256 signing key is ignored rather than fatal, so a
        # JWKS that also publishes other keys still works.
        if not isinstance(entry, Mapping):
            continue
        kid, n, e = entry.get("kid"), entry.get("n"), entry.get("e")
        if (
            entry.get("kty") != "RSA"
            or entry.get("alg", ALGORITHM) != ALGORITHM
            or entry.get("use", "sig") != "sig"
            or not isinstance(kid, str)
            or not kid
            or not isinstance(n, str)
            or not isinstance(e, str)
            or kid in keys
        ):
            continue
        try:
            modulus = int.from_bytes(b64url_decode(n), "big")
            exponent = int.from_bytes(b64url_decode(e), "big")
            rsa.RSAPublicNumbers(exponent, modulus).public_key()
        except ValueError:
            continue
        if modulus.bit_length() < MIN_RSA_BITS:
            continue
        keys[kid] = dict(entry)
    if not keys:
        raise ValueError("JWKS document has no usable RS256 signing key")
    return keys


class JwksCache:
    """The verification keys of a JWKS endpoint, fetched lazily and shared by all requests.

    - Cold: the first `key()` fetches and waits. Stale (older than `refresh_interval`):
      the known keys keep serving while one background fetch renews them.
    - Unknown kid: one refresh, but at most once per `unknown_kid_cooldown` since the last
      fetch of any kind, so tokens with made-up kids cannot turn into a fetch storm.
    - Single flight: concurrent callers share the one fetch in progress.
    - A failed fetch keeps the keys we have (retried after `failure_backoff`); with no keys
      at all `key()` raises JwksUnavailable, since a 401 would blame a token we cannot check.
    """

    def __init__(
        self,
        fetch: Callable[[], Awaitable[Mapping[str, Any]]],
        *,
        refresh_interval: float = 300.0,
        unknown_kid_cooldown: float = 30.0,
        failure_backoff: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._refresh_interval = refresh_interval
        self._cooldown = unknown_kid_cooldown
        self._failure_backoff = failure_backoff
        self._clock = clock
        self._keys: dict[str, dict[str, Any]] = {}
        self._loaded_at: float | None = None
        self._attempted_at = -math.inf
        self._failed = False
        self._inflight: asyncio.Task[None] | None = None
        self.fetches = 0

    @classmethod
    def static(cls, document: Mapping[str, Any]) -> JwksCache:
        """A cache over a fixed key set (tests, single-process tools): it never refetches."""

        async def same() -> Mapping[str, Any]:
            return document

        cache = cls(same, refresh_interval=math.inf, unknown_kid_cooldown=math.inf)
        cache.load(document)
        return cache

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def load(self, document: Mapping[str, Any]) -> None:
        """Replace the key set with `document`'s (ValueError if it has no usable key)."""
        self._keys = _usable_keys(document)
        self._loaded_at = self._clock()
        self._failed = False

    async def refresh(self) -> bool:
        """Fetch now (or join the fetch under way); True if the key set is fresh after it."""
        await asyncio.shield(self._start_fetch())
        return not self._failed

    async def key(self, kid: str) -> Mapping[str, Any] | None:
        now = self._clock()
        if self._is_stale(now):
            task = self._start_fetch()
            if not self._keys:
                await asyncio.shield(task)
        found = self._keys.get(kid)
        if found is None:
            # A fetch under way may bring the kid (rotation), so wait for it at no extra cost.
            if self._inflight is not None:
                await asyncio.shield(self._inflight)
            elif now - self._attempted_at >= self._cooldown:
                await asyncio.shield(self._start_fetch())
            found = self._keys.get(kid)
        if not self._keys:
            wait = self._attempted_at + self._failure_backoff - self._clock()
            raise JwksUnavailable(retry_after=math.ceil(wait))
        return found

    def _is_stale(self, now: float) -> bool:
        if self._loaded_at is not None and now - self._loaded_at < self._refresh_interval:
            return False
        if self._inflight is not None:
            return True
        return not self._failed or now - self._attempted_at >= self._failure_backoff

    def _start_fetch(self) -> asyncio.Task[None]:
        if self._inflight is None:
            self._attempted_at = self._clock()
            # Shared by every caller: not bounded by the deadline of the one that started it.
            task = asyncio.get_running_loop().create_task(
                self._fetch_and_load(), context=unbounded_context()
            )
            self._inflight = task
            task.add_done_callback(self._fetch_done)
        return self._inflight

    def _fetch_done(self, task: asyncio.Task[None]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def _fetch_and_load(self) -> None:
        self.fetches += 1
        try:
            document = await self._fetch()
            self.load(document)
        # Whatever the fetch raised (network, HTTP status, a bad document), the keys we
        # already have are still the best answer; the failure is only worth a warning.
        except Exception as exc:
            self._failed = True
            log.warning(
                "jwks fetch failed, keeping the keys already loaded",
                error=f"{type(exc).__name__}: {exc}",
                keys=len(self._keys),
            )
