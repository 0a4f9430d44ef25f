"""ServiceClient: the resilient HTTP client every service-to-service call goes through."""

from __future__ import annotations

import asyncio
import email.utils
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import httpx
import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_random_exponential

from narthex.common.breaker import AsyncCircuitBreaker, BreakerOpen
from narthex.common.context import REQUEST_ID_HEADER, current_request_id
from narthex.common.deadline import DEADLINE_HEADER, deadline_at
from narthex.common.errors import BadGateway, GatewayTimeout, ServiceUnavailable
from narthex.common.telemetry import instrument_client, trace_headers
from narthex.common.transport import Exchange, H1Transport, ResponseTooLarge

log = structlog.get_logger("narthex.http")


class _HasStatus(Protocol):
    @property
    def status_code(self) -> int: ...


R = TypeVar("R", bound=_HasStatus)

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


class UpstreamBadResponse(UpstreamError):
    """The upstream answered something this hop will not relay (an oversized answer)."""

    status, type_slug, title = BadGateway.status, BadGateway.type_slug, BadGateway.title


def _header(response: object, name: bytes) -> bytes | None:
    """One header of an `Exchange` or an `httpx.Response`."""
    if isinstance(response, Exchange):
        for key, value in response.headers:
            if key.lower() == name:
                return value
        return None
    if isinstance(response, httpx.Response):
        text = response.headers.get(name.decode())
        return None if text is None else text.encode("latin-1")
    return None


def is_backpressure(response: _HasStatus) -> bool:
    """An upstream shedding load: 429, or 503 with a valid `Retry-After`.

    Both are answers meant for the client (slow down, come back then), given by an
    upstream that is working as designed: relayed as they are, never retried, never a
    breaker failure. A 503 without `Retry-After` is an upstream failing.
    """
    status = response.status_code
    if status == 429:
        return True
    if status != 503:
        return False
    value = _header(response, b"retry-after")
    return value is not None and _valid_retry_after(value.strip())


def _valid_retry_after(value: bytes) -> bool:
    # RFC 9110 10.2.3: delay-seconds, or an HTTP-date.
    if value.isdigit():
        return len(value) <= 10
    try:
        return email.utils.parsedate_to_datetime(value.decode("latin-1")) is not None
    except (TypeError, ValueError, IndexError):
        return False


@dataclass(frozen=True)
class ClientPolicy:
    """Timeouts, retries and breaking for one upstream."""

    connect_timeout: float = 1.0
    try_timeout: float = 5.0  # one try: connecting, sending and reading the whole answer
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
    # An answer larger than this is a failure of the upstream (502), never buffered whole.
    max_response_bytes: int = 64 << 20


class RetryBudget:
    """Caps retries at `ratio` of recent requests plus a small floor, so a struggling
    upstream sees at most about (1 + ratio) x its normal load from us, never N x.

    Counts live in one-second buckets over `window` seconds: constant memory and
    constant work per request. `clock` is monotonic seconds (a seam for tests).
    """

    def __init__(
        self,
        ratio: float,
        min_per_second: float,
        window: int = 10,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self.ratio = ratio
        self.floor = min_per_second * window
        self.window = window
        self._second = [-1] * window
        self._requests = [0] * window
        self._retries = [0] * window

    def _bucket(self) -> int:
        second = int(self._clock())
        slot = second % self.window
        if self._second[slot] != second:  # a bucket from a previous lap: recycle it
            self._second[slot] = second
            self._requests[slot] = self._retries[slot] = 0
        return slot

    def _live(self, counts: list[int]) -> int:
        oldest = int(self._clock()) - self.window
        return sum(n for n, s in zip(counts, self._second, strict=True) if s > oldest)

    def record_request(self) -> None:
        self._requests[self._bucket()] += 1

    def try_spend(self) -> bool:
        slot = self._bucket()
        if self._live(self._retries) >= self.ratio * self._live(self._requests) + self.floor:
            return False
        self._retries[slot] += 1
        return True


class _Attempt(Exception):
    """One failed attempt, classified for the retry and breaker decisions."""

    def __init__(self, kind: str, sent: bool, response: object | None = None) -> None:
        super().__init__(kind)
        # connect | timeout | dropped | status | oversized: the upstream's failures;
        # pool | deadline: ours or the caller's (see _NEUTRAL).
        self.kind = kind
        self.sent = sent
        self.response = response


# Outcomes that say nothing about the upstream's health: our own connection pool being
# full, and a try cut short by the caller's deadline (or the caller's 504 from upstream:
# it dropped work our caller's budget no longer covered). A client chooses its deadline,
# so what it causes must never move a breaker that every tenant shares.
_NEUTRAL = frozenset({"pool", "deadline"})
# Not worth another try: the caller's budget is gone, or the upstream would only send
# the same oversized answer again.
_FINAL = frozenset({"deadline", "oversized"})


def _counts_against_upstream(exc: BaseException) -> bool:
    return not (isinstance(exc, _Attempt) and exc.kind in _NEUTRAL)


class ServiceClient:
    """One long-lived `httpx.AsyncClient` per upstream, behind deadline, retry and breaker.

    - Each try is bounded by the connect/read timeouts and by what is left of the
      overall deadline (the caller's, when it propagated one), so retries never
      outlive the caller.
    - Retries (jittered exponential backoff, full jitter) only when the request is
      idempotent or provably never left this process (connect failures); a POST that
      was sent is never retried unless the caller marks it idempotent.
    - A retry budget bounds retries under sustained failure.
    - 5xx, timeouts and connection failures count against the breaker; 4xx never do,
      nor does backpressure (`is_backpressure`: 429, 503 with Retry-After), which is
      returned at once, unretried. A try that the *caller's* deadline cut short (its
      timeout, or the upstream's 504 for it) is neutral: the caller chose that budget.
    - Failures surface as `UpstreamTimeout` (504) / `UpstreamUnavailable` /
      `CircuitOpen` (503) / `UpstreamBadResponse` (502), each with `Retry-After`. A 5xx
      that survives the retries is returned as a response: the caller decides what it
      means.
    """

    def __init__(
        self,
        name: str,
        base_url: str,
        policy: ClientPolicy | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
        breaker_clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.policy = policy = policy or ClientPolicy()
        self.breaker = AsyncCircuitBreaker(
            name,
            fail_max=policy.breaker_fail_max,
            reset_timeout=policy.breaker_reset_timeout,
            is_failure=_counts_against_upstream,
            clock=breaker_clock,
        )
        self.budget = RetryBudget(policy.retry_budget_ratio, policy.retry_budget_min_per_second)
        self._base_url = httpx.URL(base_url)
        # forward() takes a path below the upstream's base, like httpx's base_url does.
        self._base_path = self._base_url.raw_path.decode("ascii").rstrip("/")
        self._transport = transport or H1Transport(
            max_connections=policy.max_connections,
            keepalive_expiry=policy.keepalive_expiry,
            max_response_bytes=policy.max_response_bytes,
        )
        self._client = httpx.AsyncClient(
            base_url=base_url,
            transport=self._transport,
            headers=headers,
            timeout=httpx.Timeout(policy.try_timeout, connect=policy.connect_timeout),
            follow_redirects=False,
        )
        instrument_client(self._client)

    @property
    def http(self) -> httpx.AsyncClient:
        return self._client

    @property
    def base_url(self) -> httpx.URL:
        return self._base_url

    @property
    def base_path(self) -> str:
        """The base URL's path, without its trailing slash ("" for none)."""
        return self._base_path

    async def aclose(self) -> None:
        await self._client.aclose()

    async def probe(self, path: str, within: float) -> httpx.Response:
        """One GET of `path`, around the breaker, the retries and the retry budget.

        For background health checks: a probe must neither be refused by an open
        breaker (it is how we learn the upstream is back) nor move it.
        """
        return await self._client.get(path, timeout=within)

    async def __aenter__(self) -> ServiceClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

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
        """Send a built request under this client's policy (the httpx path)."""
        request_id = current_request_id()
        if request_id and REQUEST_ID_HEADER not in request.headers:
            request.headers[REQUEST_ID_HEADER] = request_id

        async def attempt(left: float) -> httpx.Response:
            budget = min(self.policy.try_timeout, left)
            request.headers[DEADLINE_HEADER] = _budget_ms(budget).decode()
            request.extensions["timeout"] = self._timeouts(left)
            # httpx has no whole-request timeout; this is the try's, so try_timeout
            # holds on any transport (`_timeouts` leaves httpx's per-phase ones off).
            async with asyncio.timeout(budget):
                return await self._client.send(request)

        return await self._call(request.method, request.url.path, attempt, deadline, idempotent)

    async def forward(
        self,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        *,
        deadline: float | None = None,
        idempotent: bool | None = None,
    ) -> Exchange:
        """Relay raw headers and body to `target` (path and query) under the same policy.

        The proxy's path: no httpx models are built, which is most of a proxy's cost
        (see `narthex.common.transport`). Trace context and request id are added here
        because the httpx instrumentation does not see this path.
        """
        transport = self._transport
        if not isinstance(transport, H1Transport):
            # A client built on another transport (tests, in-process apps) relays via httpx.
            response = await self.send(
                self._client.build_request(method, target, headers=headers, content=body),
                deadline=deadline,
                idempotent=idempotent,
            )
            return Exchange(response.status_code, list(response.headers.raw), response.content)
        url = self._base_url
        headers = list(headers)
        request_id = current_request_id()
        if request_id:
            headers.append((b"x-request-id", request_id.encode()))
        headers.extend(trace_headers())

        async def attempt(left: float) -> Exchange:
            budget = min(self.policy.try_timeout, left)
            sent = [*headers, (DEADLINE_HEADER.encode(), _budget_ms(budget))]
            return await transport.exchange(
                url, method, self._base_path + target, sent, body, self._timeouts(left)
            )

        return await self._call(method, target, attempt, deadline, idempotent)

    def _timeouts(self, left: float) -> dict[str, float | None]:
        policy = self.policy
        # One timer for the whole try, plus waiting for a free connection and
        # connecting when those happen: per-read timers
        # cost the proxy path ~25 us a request and add nothing a try timeout lacks.
        return {
            "total": min(policy.try_timeout, left),
            "connect": min(policy.connect_timeout, left),
            "read": None,
            "write": None,
            "pool": min(policy.connect_timeout, left),
        }

    async def _call(
        self,
        method: str,
        path: str,
        attempt: Callable[[float], Awaitable[R]],
        deadline: float | None,
        idempotent: bool | None,
    ) -> R:
        policy = self.policy
        caller_at = deadline_at()
        own_at = time.monotonic() + (policy.deadline if deadline is None else deadline)
        at = min(caller_at, own_at)
        if idempotent is None:
            idempotent = method in IDEMPOTENT_METHODS
        self.budget.record_request()

        def may_retry(exc: BaseException) -> bool:
            return (
                isinstance(exc, _Attempt)
                and exc.kind not in _FINAL
                and (idempotent or not exc.sent)
            )

        async def bounded() -> R:
            # Checked before the breaker: a spent budget says nothing about the upstream.
            now = time.monotonic()
            left = at - now
            if left <= 0:
                raise _Attempt("deadline", sent=False)
            # Whether the caller's deadline, rather than this client's own limits, is
            # what ends this try (and its connecting, which has a shorter limit).
            own_end = min(now + policy.try_timeout, own_at)
            cut = caller_at <= own_end
            cut_connect = caller_at <= min(now + policy.connect_timeout, own_end)
            return await self._breaker_call(lambda: _classify(attempt, left, cut, cut_connect))

        try:
            # The first try runs outside tenacity: the common case (success) should not
            # pay for retry bookkeeping (~25 us a call, measured).
            return await bounded()
        except _Attempt as failure:
            first_failure: _Attempt | None = failure
            if not (policy.retries and policy.max_attempts > 1 and may_retry(failure)):
                return cast(R, self._give_up(failure, method, path))

        def stop(state: RetryCallState) -> bool:
            # Evaluated after tenacity drew the (jittered) sleep: give up when that
            # sleep would take us past the deadline, or the budget has no retry left.
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
            async for try_ in retrying:
                with try_:
                    if first_failure is not None:
                        # Tenacity's attempt 1 is the try already made: hand it its
                        # outcome instead of sending the request again.
                        replay, first_failure = first_failure, None
                        raise replay
                    return await bounded()
        except _Attempt as last:
            return cast(R, self._give_up(last, method, path))
        raise AssertionError("unreachable: tenacity either returns or reraises")

    async def _breaker_call(self, fn: Callable[[], Awaitable[R]]) -> R:
        try:
            return await self.breaker.call(fn)
        except BreakerOpen as exc:
            raise CircuitOpen(self.name, exc.retry_after) from None

    def _give_up(self, failure: _Attempt, method: str, path: str) -> object:
        log.warning(
            "upstream call failed",
            upstream=self.name,
            method=method,
            path=path,
            failure=failure.kind,
            cause=repr(failure.__cause__) if failure.__cause__ else None,
        )
        if failure.response is not None:
            return failure.response
        if failure.kind in ("timeout", "deadline"):
            raise UpstreamTimeout(self.name) from None
        if failure.kind == "oversized":
            raise UpstreamBadResponse(self.name) from None
        raise UpstreamUnavailable(self.name) from None


def _budget_ms(seconds: float) -> bytes:
    """The callee's share of our deadline: what this try will wait, in milliseconds."""
    return b"%d" % max(1, int(seconds * 1000))


async def _classify(
    attempt: Callable[[float], Awaitable[R]], left: float, cut: bool, cut_connect: bool
) -> R:
    """Run one try (which must end within `left` seconds); classify its failures.

    `cut` / `cut_connect`: the caller's deadline is what bounds the try / its connecting,
    so running out of time there is the caller's doing, not the upstream's.
    """
    try:
        response = await attempt(left)
    except httpx.ConnectError as exc:
        raise _Attempt("connect", sent=False) from exc
    except httpx.ConnectTimeout as exc:
        raise _Attempt("deadline" if cut_connect else "connect", sent=False) from exc
    except httpx.PoolTimeout as exc:
        raise _Attempt("pool", sent=False) from exc
    except (httpx.TimeoutException, TimeoutError) as exc:
        raise _Attempt("deadline" if cut else "timeout", sent=True) from exc
    except ResponseTooLarge as exc:
        raise _Attempt("oversized", sent=True) from exc
    except (
        httpx.RemoteProtocolError,
        httpx.ReadError,
        httpx.WriteError,
        httpx.NetworkError,
    ) as exc:
        raise _Attempt("dropped", sent=True) from exc
    status = response.status_code
    if status >= 500 and not is_backpressure(response):
        kind = "deadline" if cut and status == 504 else "status"
        raise _Attempt(kind, sent=True, response=response)
    return response
