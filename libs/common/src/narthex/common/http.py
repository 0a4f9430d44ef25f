"""ServiceClient: the resilient HTTP client every service-to-service call goes through."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_random_exponential

from narthex.common.breaker import AsyncCircuitBreaker, BreakerOpen
from narthex.common.context import REQUEST_ID_HEADER, current_request_id
from narthex.common.deadline import DEADLINE_HEADER, deadline_at
from narthex.common.errors import GatewayTimeout, ServiceUnavailable
from narthex.common.telemetry import instrument_client
from narthex.common.transport import AiohttpTransport

log = structlog.get_logger("narthex.http")

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class UpstreamError(ServiceUnavailable):
    """Base of the typed errors a ServiceClient raises; each renders as a problem."""

    def __init__(self, upstream: str, retry_after: float = 1.0, detail: str | None = None) -> None:
        super().__init__(
            detail,
            headers={"Retry-After": str(max(1, math.ceil(retry_after)))},
        )
        self.upstream = upstream
        self.retry_after = retry_after


class UpstreamUnavailable(UpstreamError):
    type_slug, title = "upstream-unavailable", "Upstream service unavailable"


class UpstreamTimeout(UpstreamError):
    status, type_slug, title = (
        GatewayTimeout.status,
        GatewayTimeout.type_slug,
        GatewayTimeout.title,
    )


class CircuitOpen(UpstreamError):
    type_slug, title = "circuit-open", "Upstream service unavailable"


@dataclass(frozen=True)
class ClientPolicy:
    """Timeouts, retries and breaking for one upstream."""

    connect_timeout: float = 1.0
    read_timeout: float = 5.0
    deadline: float = 10.0
    retries: bool = True  # off when the mesh (Istio) retries instead
    max_attempts: int = 3
    backoff_base: float = 0.05
    backoff_max: float = 1.0
    retry_budget_ratio: float = 0.2
    retry_budget_min_per_second: float = 5.0
    breaker_fail_max: int = 5
    breaker_reset_timeout: float = 10.0
    max_connections: int = 200
    # Below uvicorn's 5 s keep-alive so we never reuse a connection the server is closing.
    keepalive_expiry: float = 4.0


class RetryBudget:
    """Caps retries at `ratio` of recent requests plus a small floor, so a struggling
    upstream sees at most (1 + ratio) x its normal load from us, never N x."""

    def __init__(self, ratio: float, min_per_second: float, window: float = 10.0) -> None:
        self.ratio = ratio
        self.floor = min_per_second * window
        self.window = window
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _trim(self, now: float) -> None:
        horizon = now - self.window
        for stamps in (self._requests, self._retries):
            while stamps and stamps[0] < horizon:
                stamps.popleft()

    def record_request(self) -> None:
        self._requests.append(time.monotonic())

    def try_spend(self) -> bool:
        now = time.monotonic()
        self._trim(now)
        if len(self._retries) >= self.ratio * len(self._requests) + self.floor:
            return False
        self._retries.append(now)
        return True


class _Attempt(Exception):
    """One failed attempt, classified for the retry and breaker decisions."""

    def __init__(self, kind: str, sent: bool, response: httpx.Response | None = None) -> None:
        super().__init__(kind)
        self.kind = kind  # "connect" | "timeout" | "dropped" | "status"
        self.sent = sent
        self.response = response


def _counts_against_upstream(exc: BaseException) -> bool:
    # Our own pool being full, or our caller's budget being spent, says nothing about
    # the upstream's health.
    return not (isinstance(exc, _Attempt) and exc.kind in ("pool", "deadline"))


class ServiceClient:
    """One long-lived `httpx.AsyncClient` per upstream, behind deadline, retry and breaker.

    - Each try is bounded by the connect/read timeouts and by what is left of the
      overall deadline (the caller's, when it propagated one), so retries never
      outlive the caller.
    - Retries (jittered exponential backoff, full jitter) only when the request is
      idempotent or provably never left this process (connect failures); a POST that
      was sent is never retried unless the caller marks it idempotent.
    - A retry budget bounds retries under sustained failure.
    - 5xx, timeouts and connection failures count against the breaker; 4xx never do.
    - Failures surface as `UpstreamTimeout` (504) / `UpstreamUnavailable` /
      `CircuitOpen` (503), each with `Retry-After`. A 5xx that survives the retries is
      returned as a response: the caller decides what it means.
    """

    def __init__(
        self,
        name: str,
        base_url: str,
        policy: ClientPolicy | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.policy = policy = policy or ClientPolicy()
        self.breaker = AsyncCircuitBreaker(
            name,
            fail_max=policy.breaker_fail_max,
            reset_timeout=policy.breaker_reset_timeout,
            is_failure=_counts_against_upstream,
        )
        self.budget = RetryBudget(policy.retry_budget_ratio, policy.retry_budget_min_per_second)
        self._client = httpx.AsyncClient(
            base_url=base_url,
            transport=transport
            or AiohttpTransport(
                max_connections=policy.max_connections,
                keepalive_expiry=policy.keepalive_expiry,
            ),
            headers=headers,
            timeout=httpx.Timeout(policy.read_timeout, connect=policy.connect_timeout),
            follow_redirects=False,
        )
        instrument_client(self._client)

    @property
    def http(self) -> httpx.AsyncClient:
        return self._client

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> ServiceClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def build_request(self, method: str, url: str, **kwargs: Any) -> httpx.Request:
        return self._client.build_request(method, url, **kwargs)

    async def request(
        self,
        method: str,
        url: str,
        *,
        deadline: float | None = None,
        idempotent: bool | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send a request (httpx's `build_request` keywords) under this client's policy."""
        return await self.send(
            self._client.build_request(method, url, **kwargs),
            deadline=deadline,
            idempotent=idempotent,
        )

    async def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.request("GET", url, **kwargs)

    async def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.request("POST", url, **kwargs)

    async def send(
        self,
        request: httpx.Request,
        *,
        deadline: float | None = None,
        idempotent: bool | None = None,
    ) -> httpx.Response:
        policy = self.policy
        now = time.monotonic()
        at = min(deadline_at(), now + (policy.deadline if deadline is None else deadline))
        if idempotent is None:
            idempotent = request.method in IDEMPOTENT_METHODS
        request_id = current_request_id()
        if request_id and REQUEST_ID_HEADER not in request.headers:
            request.headers[REQUEST_ID_HEADER] = request_id
        self.budget.record_request()

        def may_retry(exc: BaseException) -> bool:
            if not isinstance(exc, _Attempt) or not policy.retries:
                return False
            return idempotent or not exc.sent

        def stop(state: RetryCallState) -> bool:
            # Evaluated after tenacity drew the (jittered) sleep: give up when that
            # sleep plus the shortest useful try would pass the deadline.
            if state.attempt_number >= policy.max_attempts:
                return True
            if time.monotonic() + state.upcoming_sleep + 0.001 >= at:
                return True
            return not self.budget.try_spend()

        retrying = AsyncRetrying(
            retry=retry_if_exception(may_retry),
            wait=wait_random_exponential(multiplier=policy.backoff_base, max=policy.backoff_max),
            stop=stop,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self.breaker.call(lambda: self._attempt(request, at))
        except _Attempt as failure:
            return self._give_up(failure, request)
        except BreakerOpen as exc:
            raise CircuitOpen(self.name, exc.retry_after) from None
        raise AssertionError("unreachable: tenacity either returns or reraises")

    async def _attempt(self, request: httpx.Request, at: float) -> httpx.Response:
        left = at - time.monotonic()
        if left <= 0:
            raise _Attempt("deadline", sent=False)
        policy = self.policy
        request.headers[DEADLINE_HEADER] = str(max(1, int(left * 1000)))
        request.extensions["timeout"] = httpx.Timeout(
            min(policy.read_timeout, left),
            connect=min(policy.connect_timeout, left),
            pool=min(policy.connect_timeout, left),
        ).as_dict()
        try:
            async with asyncio.timeout(left):
                response = await self._client.send(request)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise _Attempt("connect", sent=False) from exc
        except httpx.PoolTimeout as exc:
            raise _Attempt("pool", sent=False) from exc
        except (httpx.TimeoutException, TimeoutError) as exc:
            raise _Attempt("timeout", sent=True) from exc
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            raise _Attempt("dropped", sent=True) from exc
        if response.status_code >= 500:
            raise _Attempt("status", sent=True, response=response)
        return response

    def _give_up(self, failure: _Attempt, request: httpx.Request) -> httpx.Response:
        log.warning(
            "upstream call failed",
            upstream=self.name,
            method=request.method,
            path=request.url.path,
            failure=failure.kind,
            cause=repr(failure.__cause__) if failure.__cause__ else None,
        )
        if failure.response is not None:
            return failure.response
        if failure.kind in ("timeout", "deadline"):
            raise UpstreamTimeout(self.name) from None
        raise UpstreamUnavailable(self.name) from None
