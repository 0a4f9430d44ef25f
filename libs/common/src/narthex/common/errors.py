"""Errors a client may see, and the one renderer that writes them in each route's protocol.

narthex's own APIs answer RFC 9457 problem+json; where a protocol fixes the shape the
error is written in that shape instead: the Open Inference Protocol under `/v2`
(`{"error": "..."}`, 400 for bad input as Triton does) and OpenAI's under `/v1/embeddings`
and its models list (`{"error": {"message", "type", "param", "code"}}`). The protocol is
chosen by path here, in one place, and every handler and middleware renders through
`render_error`, so a 401 from the token check and a 403 from a route look alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, Literal

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from narthex.common.context import current_request_id, current_trace_id

PROBLEM_BASE = "https://narthex.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"
JSON_MEDIA_TYPE = "application/json"

Protocol = Literal["problem", "oip", "openai"]

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


class InvalidCredentials(Unauthorized):
    type_slug, title = "invalid-credentials", "Invalid API key"

    def __init__(self) -> None:
        # One answer for every reason (unknown id, wrong secret, revoked, expired):
        # a caller probing keys learns nothing from the difference.
        super().__init__(
            "the API key is not valid", headers={"WWW-Authenticate": 'Bearer realm="narthex"'}
        )


class Forbidden(Problem):
    status, type_slug, title = 403, "forbidden", "Forbidden"


class NotFound(Problem):
    status, type_slug, title = 404, "not-found", "Not found"


class Conflict(Problem):
    status, type_slug, title = 409, "conflict", "Conflicts with the current state"


class PayloadTooLarge(Problem):
    status, type_slug, title = 413, "payload-too-large", "Request body too large"


class ValidationFailed(Problem):
    status, type_slug, title = 422, "validation-failed", "Request validation failed"


class TooManyRequests(Problem):
    status, type_slug, title = 429, "too-many-requests", "Too many requests"


class InternalError(Problem):
    """What a client sees of a bug: nothing of the bug."""


class BadGateway(Problem):
    status, type_slug, title = 502, "bad-gateway", "Upstream service failed"


class ServiceUnavailable(Problem):
    status, type_slug, title = 503, "unavailable", "Service temporarily unavailable"


class GatewayTimeout(Problem):
    status, type_slug, title = 504, "upstream-timeout", "Upstream service timed out"


def protocol_of(path: str) -> Protocol:
    """The error shape `path` speaks: the gateway and inference serve the same paths, so
    one answer holds for both."""
    if path == "/v2" or path.startswith("/v2/"):
        return "oip"
    if path == "/v1/embeddings" or path.startswith("/v1/embeddings/"):
        return "openai"
    # OpenAI's models API is the list and one model; predictions below it are narthex's.
    if path == "/v1/models" or (
        path.startswith("/v1/models/") and "/" not in path[len("/v1/models/") :]
    ):
        return "openai"
    return "problem"


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


_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def _openai_param(problem: Problem) -> str | None:
    param = problem.extra.get("param")
    if isinstance(param, str):
        return param
    errors = problem.extra.get("errors")
    if isinstance(errors, list) and errors:
        where = [str(p) for p in errors[0].get("loc", ()) if p != "body"]
        return ".".join(where) or None
    return None


def error_body(problem: Problem, path: str) -> tuple[int, str, dict[str, Any]]:
    """Status, media type and body of `problem` as the protocol of `path` writes it."""
    protocol = protocol_of(path)
    if protocol == "problem":
        body = problem_body(
            problem.status, problem.type_slug, problem.title, problem.detail, problem.extra, path
        )
        return problem.status, PROBLEM_MEDIA_TYPE, body
    # Neither protocol has a 422: bad input is a 400 in both.
    status = 400 if problem.status == 422 else problem.status
    message = problem.detail or problem.title
    if protocol == "oip":
        return status, JSON_MEDIA_TYPE, {"error": message}
    error = {
        "message": message,
        "type": _OPENAI_TYPES.get(problem.status, "api_error"),
        "param": _openai_param(problem),
        "code": problem.type_slug.replace("-", "_"),
    }
    return status, JSON_MEDIA_TYPE, {"error": error, "request_id": current_request_id()}


def render_error(problem: Problem, path: str) -> Response:
    """`problem` as the response a route at `path` answers with."""
    status, media_type, body = error_body(problem, path)
    return JSONResponse(body, status_code=status, headers=problem.headers, media_type=media_type)


async def send_error(problem: Problem, scope: Scope, receive: Receive, send: Send) -> None:
    """For middleware, which answers before (or instead of) any route."""
    await render_error(problem, scope["path"])(scope, receive, send)


def http_problem(exc: StarletteHTTPException) -> Problem:
    """Starlette's (and FastAPI's) HTTPException as the Problem every handler renders."""
    status = exc.status_code
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    problem = Problem(
        # Starlette's own details ("Not Found", "Method Not Allowed") repeat the title.
        exc.detail if isinstance(exc.detail, str) and exc.detail != phrase else None,
        headers=exc.headers,
        status=status,
    )
    problem.type_slug = phrase.lower().replace(" ", "-") if phrase != "Error" else "error"
    problem.title = phrase
    return problem


async def _on_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return render_error(exc, request.url.path)


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    return render_error(http_problem(exc), request.url.path)


def validation_problem(errors: list[Mapping[str, Any]]) -> ValidationFailed:
    """A 422 naming where each error is and what is wrong, never echoing the input."""
    # Echoing `input`/`ctx` back could reflect secrets or huge payloads; the location
    # and message are enough for a client to fix its request.
    listed = [
        {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
        for err in errors
    ]
    detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in listed[:5])
    return ValidationFailed(detail, extra={"errors": listed})


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return render_error(validation_problem(list(exc.errors())), request.url.path)


async def _on_unhandled(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", route=request.url.path)
    return render_error(InternalError(), request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unhandled)
