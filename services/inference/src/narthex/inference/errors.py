"""Inference errors and their three envelopes: OIP `{"error"}`, OpenAI's, problem+json.

Every error is a `Problem` (so the admin and v1 routes get RFC 9457 bodies as everywhere
else); the protocol a route speaks decides the envelope, here, in one place: Open
Inference Protocol routes answer `{"error": "..."}` (with 400 for bad input, as Triton
does), the OpenAI-compatible routes `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import orjson
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from narthex.common.context import current_request_id
from narthex.common.errors import (
    NotFound,
    Problem,
    ServiceUnavailable,
    ValidationFailed,
    render_problem,
)
from narthex.inference.oip import OipError

__all__ = [
    "BadSplit",
    "ComputeError",
    "Conflict",
    "DeadlineExceeded",
    "InvalidInput",
    "LoadFailed",
    "ModelNotFound",
    "Overloaded",
    "Unavailable",
    "install_error_handlers",
    "render",
]

log = structlog.get_logger("narthex.inference.errors")


class InvalidInput(ValidationFailed):
    """Wrong shape, dtype, non-finite values, too many items, a text too long..."""

    type_slug, title = "invalid-input", "Invalid model input"


class ComputeError(ValidationFailed):
    type_slug, title = "compute-failed", "The model could not compute this input"


class ModelNotFound(NotFound):
    type_slug, title = "model-not-found", "No such model or version"


class Overloaded(ServiceUnavailable):
    type_slug, title = "overloaded", "The model's queue is full"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Retry-After": "1"})


class Unavailable(ServiceUnavailable):
    type_slug, title = "model-unavailable", "The model is not ready"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Retry-After": "1"})


class DeadlineExceeded(Problem):
    status, type_slug, title = 504, "deadline-exceeded", "The request's deadline passed"


class LoadFailed(Problem):
    status, type_slug, title = 422, "load-failed", "The model version cannot be loaded"


class BadSplit(ValidationFailed):
    """Weights that are not a split of the loaded versions: nothing was changed."""

    type_slug, title = "invalid-traffic-split", "Invalid traffic split"


class Conflict(Problem):
    status, type_slug, title = 409, "conflict", "Conflicts with the current state"


def _protocol(path: str) -> str:
    if path == "/v2" or path.startswith("/v2/"):
        return "oip"
    if path.startswith("/v1/embeddings"):
        return "openai"
    return "problem"


_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def _json(status: int, body: dict[str, Any], headers: dict[str, str]) -> Response:
    return Response(
        orjson.dumps(body), status_code=status, headers=headers, media_type="application/json"
    )


def render(path: str, problem: Problem) -> Response:
    protocol = _protocol(path)
    message = problem.detail or problem.title
    if protocol == "oip":
        # Triton answers bad input with 400; the protocol has no 422.
        status = 400 if problem.status == 422 else problem.status
        return _json(status, {"error": message}, problem.headers)
    if protocol == "openai":
        status = 400 if problem.status == 422 else problem.status
        error = {
            "message": message,
            "type": _OPENAI_TYPES.get(problem.status, "api_error"),
            "param": problem.extra.get("param"),
            "code": problem.type_slug.replace("-", "_"),
        }
        body: dict[str, Any] = {"error": error}
        if (request_id := current_request_id()) is not None:
            body["request_id"] = request_id
        return _json(status, body, problem.headers)
    return render_problem(problem, instance=path)


async def _on_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return render(request.url.path, exc)


async def _on_oip_error(request: Request, exc: Exception) -> Response:
    return render(request.url.path, InvalidInput(str(exc)))


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail != phrase else phrase
    return render(request.url.path, Problem(detail, status=status, headers=exc.headers))


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    # Location and message only: echoing the input could reflect huge or secret payloads.
    detail = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
        for e in errors[:5]
    )
    param = ".".join(str(p) for p in errors[0].get("loc", ()) if p != "body") if errors else None
    return render(request.url.path, InvalidInput(detail, extra={"param": param or None}))


async def _on_unhandled(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", route=request.url.path)
    return render(request.url.path, Problem("Internal error"))


def install_error_handlers(app: FastAPI) -> None:
    """Replace the common handlers with ones that speak each route's protocol."""
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(OipError, _on_oip_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(Exception, _on_unhandled)
