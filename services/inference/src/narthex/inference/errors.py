"""Inference's errors: the refusals a model route answers with (rendered by narthex.common.errors
in the route's protocol: OIP under /v2, OpenAI's under /v1/embeddings, problem+json elsewhere)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import Response

from narthex.common.errors import (
    Conflict,
    NotFound,
    Problem,
    ServiceUnavailable,
    ValidationFailed,
    render_error,
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
]


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


class BadSplit(ValidationFailed):
    """Weights that are not a split of the loaded versions: nothing was changed."""

    type_slug, title = "invalid-traffic-split", "Invalid traffic split"


class LoadFailed(Problem):
    status, type_slug, title = 422, "load-failed", "The model version cannot be loaded"


async def _on_oip_error(request: Request, exc: Exception) -> Response:
    # The wire codec's refusals name the tensor and what is wrong with it, nothing else.
    return render_error(InvalidInput(str(exc)), request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    """The common handlers render every Problem; the codec's refusals are bad input."""
    app.add_exception_handler(OipError, _on_oip_error)
