"""`POST /v1/embeddings` answered as pure ASGI, ahead of FastAPI's router, as the route would.

FastAPI's routing, dependency solving and body handling cost the event loop more per
one-text request than the rest of the request's work on it, and the loop shares this host's
cores with ONNX Runtime. `EmbeddingsEndpoint` runs innermost (`service_app`'s
`inner_middleware`): the caller's token is verified and the body read under the cap before
it runs, and the request context (request id, deadline, metrics, access log) still wraps it.
It answers through the route's own `answer_embeddings`, and refuses what the declared route
(`narthex.inference.routes.embeddings`) refuses, in the order FastAPI checks:

1. the body, parsed as FastAPI parses it: JSON only under an `application/json` or `+json`
   content type, by `json.loads` (its encoding detection, NaN); a decode error names its
   position; any other failure is "There was an error parsing the body";
2. the caller's token must carry the inference scope (the route's dependency);
3. the canary key header's length and the body's schema, reported together, header first.

Any other method or path, and a mounted app (a `root_path`), goes on to the router.
"""

from __future__ import annotations

import email.message
import functools
import json
from collections.abc import Mapping
from typing import Annotated, Any, Final

from pydantic import Field, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from narthex.common import scopes
from narthex.common.authn import MissingToken, check_access
from narthex.common.errors import Problem, http_problem, render_error, validation_problem
from narthex.common.middleware import ROUTE_SCOPE_KEY
from narthex.common.tokens import Principal
from narthex.inference.routes import InferenceState, answer_embeddings
from narthex.inference.schemas import EmbeddingsRequest
from narthex.inference.traffic import KEY_HEADER, KEY_MAX_LENGTH

__all__ = ["PATH", "EmbeddingsEndpoint", "parse_body", "validate"]

PATH: Final = "/v1/embeddings"
_KEY: Final = KEY_HEADER.encode()
# What FastAPI validates the body and the key header with (its body field validates with
# `from_attributes`, which decides the error a non-object body gets).
_BODY: Final = TypeAdapter(EmbeddingsRequest)
_KEY_VALUE: Final = TypeAdapter(Annotated[str, Field(max_length=KEY_MAX_LENGTH)])
_PARSE_FAILED: Final = "There was an error parsing the body"
# FastAPI's `Undefined`: an empty body, which is "missing" rather than invalid.
_NO_BODY: Final = object()


def _unparseable() -> Problem:
    return http_problem(HTTPException(status_code=400, detail=_PARSE_FAILED))


@functools.lru_cache(maxsize=64)
def _is_json(content_type: str) -> bool:
    # FastAPI's test, through the email parser (parameters, case, spacing); callers send a
    # handful of distinct values, so each is parsed once.
    message = email.message.Message()
    message["content-type"] = content_type
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


def parse_body(body: bytes, content_type: str | None) -> Any:
    """The body as FastAPI hands it to validation: JSON under a JSON content type, else the
    bytes themselves (which then fail as not an object); `_NO_BODY` when empty."""
    if not body:
        return _NO_BODY
    try:
        if not content_type or not _is_json(content_type):
            return body
        return json.loads(body)
    except json.JSONDecodeError as error:
        located = {"type": "json_invalid", "loc": ("body", error.pos), "msg": "JSON decode error"}
        raise validation_problem([located]) from error
    except Exception as error:  # a bad encoding, nesting too deep: FastAPI's catch-all
        raise _unparseable() from error


def _located(error: ValidationError, prefix: tuple[str, ...]) -> list[Mapping[str, Any]]:
    return [{**e, "loc": (*prefix, *e["loc"])} for e in error.errors(include_url=False)]


def validate(value: Any, key: str | None) -> EmbeddingsRequest:
    """The request, or one 422 listing what is wrong with the key header and the body."""
    errors: list[Mapping[str, Any]] = []
    if key is not None:
        try:
            _KEY_VALUE.validate_python(key)
        except ValidationError as error:
            errors.extend(_located(error, ("header", KEY_HEADER)))
    request = None
    if value is _NO_BODY:
        errors.append({"type": "missing", "loc": ("body",), "msg": "Field required"})
    else:
        try:
            request = _BODY.validate_python(value, from_attributes=True)
        except ValidationError as error:
            errors.extend(_located(error, ("body",)))
    if errors or request is None:
        raise validation_problem(errors)
    return request


async def _read(receive: Receive) -> bytes:
    # BodyLimitMiddleware has read it already and replays it in one message.
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _unparseable()  # what FastAPI makes of a disconnect while reading
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _answer(scope: Scope, receive: Receive) -> Response:
    content_type = key = None
    for name, value in scope["headers"]:  # the first of each, as Starlette's Headers.get
        if name == b"content-type":
            if content_type is None:
                content_type = value.decode("latin-1")
        elif name == _KEY and key is None:
            key = value.decode("latin-1")
    value = parse_body(await _read(receive), content_type)
    state = scope["state"]
    principal: Principal | None = state.get("principal")
    if principal is None:  # outside RequireTokenMiddleware's reach, as the route's dependency
        raise MissingToken()
    check_access(principal, role=None, scope=scopes.INFERENCE)
    request = validate(value, key)
    resources: InferenceState = state
    return await answer_embeddings(resources["service"], request, tenant=principal.tenant, key=key)


class EmbeddingsEndpoint:
    """Answers `POST /v1/embeddings`; passes everything else on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != PATH
            or scope["method"] != "POST"
            or scope.get("root_path")
        ):
            await self.app(scope, receive, send)
            return
        scope[ROUTE_SCOPE_KEY] = PATH  # the route template the router would have matched
        try:
            response = await _answer(scope, receive)
        except Problem as problem:
            response = render_error(problem, PATH)
        await response(scope, receive, send)
