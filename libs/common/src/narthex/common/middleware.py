"""Request context: request id, deadline, RED metrics, access log and the last-resort 500."""

from __future__ import annotations

import json
import logging
import random
import time
from contextlib import nullcontext
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from narthex.common.context import accept_request_id, request_id_var
from narthex.common.deadline import DEFAULT_FLOOR_MS, deadline, parse_header
from narthex.common.errors import InternalError, error_body
from narthex.common.logging import log_line
from narthex.common.metrics import HttpMetrics

ACCESS_LOGGER = "narthex.access"
log = structlog.get_logger(ACCESS_LOGGER)

# Probe and scrape paths: neither logged nor traced when they succeed, unless the call
# carries a trace context (then it is part of a traced request, not a kubelet poll).
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

# Set by handlers that route by data rather than by path template (the gateway proxy), or
# that answer ahead of the router (inference's embeddings), so that metrics stay labelled by
# a bounded set of names.
ROUTE_SCOPE_KEY = "narthex.route"


def route_template(scope: Scope) -> str:
    name = scope.get(ROUTE_SCOPE_KEY)
    if name is not None:
        return str(name)
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class RequestContextMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware: it costs a task and a queue per request)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: HttpMetrics,
        access_log_sample_rate: float = 1.0,
        deadline_floor_ms: int = DEFAULT_FLOOR_MS,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.sample_rate = access_log_sample_rate
        # A caller's deadline bounds its own request, never below this: see deadline.py.
        self.deadline_floor_ms = deadline_floor_ms

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming_id = budget = None
        quiet = scope["path"] in QUIET_PATHS
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming_id = value.decode("latin-1")
            elif name == b"x-request-timeout-ms":
                budget = parse_header(value.decode("latin-1"), self.deadline_floor_ms)
            elif name == b"traceparent":
                quiet = False
        request_id = accept_request_id(incoming_id)
        id_header = (b"x-request-id", request_id.encode())
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        token = request_id_var.set(request_id)
        start = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            with deadline(budget) if budget is not None else nullcontext():
                try:
                    await self.app(scope, receive, send_with_id)
                except Exception:
                    # Anything that reaches here escaped every handler: log it with its
                    # trace, answer a bare problem, never the exception text.
                    log.exception("unhandled error", path=scope.get("path"))
                    if not started:
                        await _send_internal_error(send_with_id, scope)
                finally:
                    elapsed = time.perf_counter() - start
                    route = route_template(scope)
                    self.metrics.observe(scope["method"], route, status, elapsed)
                    if not (quiet and status < 400):
                        self._access_log(scope, route, status, elapsed)
        finally:
            self.metrics.in_flight.dec()
            request_id_var.reset(token)

    def _access_log(self, scope: Scope, route: str, status: int, elapsed: float) -> None:
        if status < 400 and self.sample_rate < 1.0 and random.random() >= self.sample_rate:
            return
        fields: dict[str, Any] = {
            "method": scope["method"],
            "route": route,
            "status": status,
            "latency_ms": round(elapsed * 1000, 3),
        }
        tenant = scope.get("state", {}).get("tenant")
        if tenant is not None:
            fields["tenant"] = tenant
        level = (
            logging.ERROR if status >= 500 else logging.WARNING if status >= 400 else logging.INFO
        )
        log_line(ACCESS_LOGGER, level, "request", fields)


async def _send_internal_error(send: Send, scope: Scope) -> None:
    status, media_type, document = error_body(InternalError(), scope["path"])
    body = json.dumps(document)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", media_type.encode())],
        }
    )
    await send({"type": "http.response.body", "body": body.encode()})
