"""Problem details (RFC 9457): the one error envelope of narthex's own APIs, and its handlers."""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from narthex.common.context import current_request_id, current_trace_id

PROBLEM_BASE = "https://narthex.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"

log = structlog.get_logger("narthex.errors")


class Problem(Exception):
    """An error a client may see. Subclasses fix the status, type and title."""

    status: int = 500
    type_slug: str = "internal"
    title: str = "Internal error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})
        if status is not None:
            self.status = status


class BadRequest(Problem):
    status, type_slug, title = 400, "bad-request", "Bad request"


class Unauthorized(Problem):
    status, type_slug, title = 401, "unauthorized", "Authentication required"


class Forbidden(Problem):
    status, type_slug, title = 403, "forbidden", "Forbidden"


class NotFound(Problem):
    status, type_slug, title = 404, "not-found", "Not found"


class PayloadTooLarge(Problem):
    status, type_slug, title = 413, "payload-too-large", "Request body too large"


class ValidationFailed(Problem):
    status, type_slug, title = 422, "validation-failed", "Request validation failed"


class BadGateway(Problem):
    status, type_slug, title = 502, "bad-gateway", "Upstream service failed"


class ServiceUnavailable(Problem):
    status, type_slug, title = 503, "unavailable", "Service temporarily unavailable"


class GatewayTimeout(Problem):
    status, type_slug, title = 504, "upstream-timeout", "Upstream service timed out"


def problem_body(
    status: int,
    type_slug: str,
    title: str,
    detail: str | None = None,
    extra: Mapping[str, Any] | None = None,
    instance: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + type_slug,
        "title": title,
        "status": status,
    }
    if detail:
        body["detail"] = detail
    if instance:
        body["instance"] = instance
    body.update(extra or {})
    body["request_id"] = current_request_id()
    body["trace_id"] = current_trace_id()
    return body


def problem_response(
    status: int,
    type_slug: str,
    title: str,
    detail: str | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
    instance: str | None = None,
) -> JSONResponse:
    return JSONResponse(
        problem_body(status, type_slug, title, detail, extra, instance),
        status_code=status,
        headers=dict(headers or {}),
        media_type=PROBLEM_MEDIA_TYPE,
    )


def render_problem(problem: Problem, instance: str | None = None) -> JSONResponse:
    return problem_response(
        problem.status,
        problem.type_slug,
        problem.title,
        problem.detail,
        headers=problem.headers,
        extra=problem.extra,
        instance=instance,
    )


def _slug(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "-")
    except ValueError:
        return "error"


async def _on_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return render_problem(exc, instance=request.url.path)


async def _on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    title = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    # Starlette's own details ("Not Found", "Method Not Allowed") repeat the title.
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail != title else None
    return problem_response(
        status,
        _slug(status),
        title,
        detail,
        headers=exc.headers,
        instance=request.url.path,
    )


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # Echoing `input`/`ctx` back could reflect secrets or huge payloads; the location
    # and message are enough for a client to fix its request.
    errors = [
        {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
        for err in exc.errors()
    ]
    return problem_response(
        422,
        ValidationFailed.type_slug,
        ValidationFailed.title,
        "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors[:5]),
        extra={"errors": errors},
        instance=request.url.path,
    )


async def _on_unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", route=request.url.path)
    return problem_response(500, "internal", "Internal error", instance=request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unhandled)
