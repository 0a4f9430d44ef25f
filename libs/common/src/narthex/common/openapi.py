"""The error responses every operation may give, written into each service's OpenAPI.

Routes declare what is theirs (`responses=error_responses(404, 409)`); the layers every
service shares add theirs here (the token check's 401/403, the body cap's 413, request
validation's 422), and every error response gets the envelope of its route's protocol
(narthex.common.errors), so that the description says what a client really receives.
"""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

from narthex.common.errors import JSON_MEDIA_TYPE, PROBLEM_MEDIA_TYPE, Protocol, protocol_of

__all__ = ["document_errors", "error_responses"]

_METHODS = frozenset({"get", "put", "post", "delete", "patch", "head", "options"})
_WITH_BODY = frozenset({"post", "put", "patch", "delete"})

_SCHEMAS: dict[str, dict[str, Any]] = {
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details",
        "required": ["type", "title", "status"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "instance": {"type": "string"},
            "request_id": {"type": ["string", "null"]},
            "trace_id": {"type": ["string", "null"]},
        },
    },
    "OipError": {
        "type": "object",
        "description": "An Open Inference Protocol error",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
    },
    "OpenAIError": {
        "type": "object",
        "description": "An error as OpenAI's API writes it",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            },
            "request_id": {"type": ["string", "null"]},
        },
    },
}
_ENVELOPES: dict[Protocol, tuple[str, str]] = {
    "problem": (PROBLEM_MEDIA_TYPE, "Problem"),
    "oip": (JSON_MEDIA_TYPE, "OipError"),
    "openai": (JSON_MEDIA_TYPE, "OpenAIError"),
}
# FastAPI's own description of a 422, which is not what narthex answers.
_FASTAPI_VALIDATION = "#/components/schemas/HTTPValidationError"


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route that answers these errors itself; the envelope is added
    when the OpenAPI is built."""
    return {status: {"description": HTTPStatus(status).phrase} for status in statuses}


def _shared_errors(
    path: str, method: str, operation: dict[str, Any], authenticated: bool
) -> Iterable[int]:
    if authenticated:
        yield from (401, 403)
    if method in _WITH_BODY:
        yield from (400, 413)  # a Content-Length that is no number; the body cap
    if "{" in path:
        yield 404  # what the path names does not exist
    if operation.get("parameters") or operation.get("requestBody"):
        yield 422


def _is_described(response: dict[str, Any]) -> bool:
    """The route gave this error response a body of its own (the gateway's 503 status),
    or said it has none (`"content": {}`: a probe's bare status)."""
    if "content" in response and not response["content"]:
        return True
    for media in response.get("content", {}).values():
        schema = media.get("schema") or {}
        if schema and schema.get("$ref") != _FASTAPI_VALIDATION:
            return True
    return False


def document_errors(
    schema: dict[str, Any], *, authenticated: bool, open_paths: frozenset[str]
) -> dict[str, Any]:
    """`schema` (FastAPI's OpenAPI document), with every error response an operation may
    give listed, in its protocol's envelope."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(_SCHEMAS)
    for path, item in schema.get("paths", {}).items():
        protocol = protocol_of(path)
        media_type, name = _ENVELOPES[protocol]
        for method, operation in item.items():
            if method not in _METHODS:
                continue
            responses: dict[str, Any] = operation.setdefault("responses", {})
            checked = authenticated and path not in open_paths
            for shared in _shared_errors(path, method, operation, checked):
                # Neither inference protocol has a 422: bad input is a 400 in both.
                status = 400 if shared == 422 and protocol != "problem" else shared
                responses.setdefault(str(status), {"description": HTTPStatus(status).phrase})
            if protocol != "problem":
                responses.pop("422", None)
            envelope = {media_type: {"schema": {"$ref": f"#/components/schemas/{name}"}}}
            for code, response in responses.items():
                if str(code)[0] in "45" and not _is_described(response):
                    response["content"] = envelope
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return schema
