"""A service's own credential: its API key exchanged at auth for a JWT, renewed before expiry.

Zero trust inside: a service calling another on its own behalf (inference reading
features) carries a verified JWT of its own, never a caller's. One `ServiceCredential` per
process holds the current token and renews it ahead of expiry in the background, so a
call almost never waits for auth. Exchanges are single-flight (a burst of callers makes
one), go through a `ServiceClient` (its breaker keeps a dead auth service from costing
more than a failed call), and after a failure none is tried again for `retry_seconds`
(longer when auth refused the key: that will not fix itself).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import structlog
from pydantic import SecretStr

from narthex.common.http import ServiceClient, UpstreamError

__all__ = ["CredentialUnavailable", "ServiceCredential"]

log = structlog.get_logger("narthex.credential")

TOKEN_PATH = "/v1/auth/token"  # noqa: S105 - a path, not a secret


class CredentialUnavailable(Exception):
    """No usable token: auth unreachable, the key refused, or a retry not due yet."""


class ServiceCredential:
    """A token for `key`, from the auth service behind `auth`.

    `clock` is monotonic seconds (injectable for tests). A token is renewed once half its
    lifetime has passed, and used until `expiry_margin` seconds before it expires.
    """

    def __init__(
        self,
        auth: ServiceClient,
        key: SecretStr,
        *,
        expiry_margin: float = 5.0,
        retry_seconds: float = 1.0,
        refused_retry_seconds: float = 30.0,
        exchange_deadline: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.auth = auth
        self._key = key
        self.expiry_margin = expiry_margin
        self.retry_seconds = retry_seconds
        self.refused_retry_seconds = refused_retry_seconds
        self.exchange_deadline = exchange_deadline
        self.clock = clock
        self._token: str | None = None
        self._renew_at = 0.0
        self._usable_until = 0.0
        self._retry_at = 0.0
        self._problem = "no token yet"
        self._pending: asyncio.Future[str] | None = None
        self.exchanges = 0  # calls made to auth, for tests and metrics

    async def token(self) -> str:
        """A valid token: the held one (renewal started in the background when due), or
        a fresh one. CredentialUnavailable when there is none to give."""
        now = self.clock()
        token = self._token
        if token is not None and now < self._usable_until:
            if now >= self._renew_at and now >= self._retry_at:
                self._exchange_once()  # not awaited: the held token still serves
            return token
        if now < self._retry_at:
            raise CredentialUnavailable(self._problem)
        return await asyncio.shield(self._exchange_once())

    def refresh_soon(self) -> None:
        """Start an exchange now if none is running and none failed lately (at start-up,
        so the first call finds a token)."""
        if self.clock() >= self._retry_at:
            self._exchange_once()

    def invalidate(self, token: str) -> None:
        """`token` was refused downstream (revoked, or signed by a retired key): drop it,
        unless a newer one has replaced it already."""
        if token == self._token:
            self._token = None
            self._usable_until = 0.0

    async def aclose(self) -> None:
        pending = self._pending
        if pending is not None and not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)

    def _exchange_once(self) -> asyncio.Future[str]:
        pending = self._pending
        if pending is None or pending.done():
            pending = self._pending = asyncio.ensure_future(self._exchange())
            # Retrieved here: a background renewal may have no one awaiting it.
            pending.add_done_callback(lambda f: f.cancelled() or f.exception())
        return pending

    async def _exchange(self) -> str:
        self.exchanges += 1
        sent = self.clock()
        try:
            response = await self.auth.post(
                TOKEN_PATH,
                headers={"x-api-key": self._key.get_secret_value()},
                deadline=self.exchange_deadline,
            )
        except UpstreamError as exc:
            problem = f"auth unavailable: {type(exc).__name__}"
            raise self._failed(problem, self.retry_seconds) from None
        if response.status_code in (400, 401, 403):
            raise self._failed(
                f"auth refused the service key ({response.status_code})",
                self.refused_retry_seconds,
            )
        try:
            if response.status_code != 200:
                raise ValueError(f"status {response.status_code}")
            body: Any = response.json()
            token, lifetime = body["access_token"], float(body["expires_in"])
            if not isinstance(token, str) or not token or lifetime <= 0:
                raise ValueError("no token in the answer")
        except (ValueError, KeyError, TypeError) as exc:
            raise self._failed(f"auth answered badly: {exc}", self.retry_seconds) from None
        self._token = token
        self._usable_until = sent + lifetime - self.expiry_margin
        self._renew_at = sent + lifetime / 2
        self._retry_at = 0.0
        return token

    def _failed(self, problem: str, retry_in: float) -> CredentialUnavailable:
        self._problem = problem
        self._retry_at = self.clock() + retry_in
        log.warning("service credential: no new token", problem=problem, retry_in=retry_in)
        return CredentialUnavailable(problem)
