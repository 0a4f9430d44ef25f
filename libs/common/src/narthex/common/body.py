"""Request bodies under a size cap and a deadline: read once, 413 or 408, replayed to the app."""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from narthex.common.errors import BadRequest, PayloadTooLarge, Problem, render_problem

__all__ = ["BodyLimitMiddleware", "RequestTimeout", "read_body"]


class RequestTimeout(Problem):
    """The body did not arrive in time. The connection is closed after the answer: the
    rest of a body that slow is not worth reading."""

    status, type_slug, title = 408, "request-timeout", "Request body not received in time"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Connection": "close"})


async def read_body(
    scope: Scope, receive: Receive, limit: int, time_limit: float | None = None
) -> bytes:
    """The whole body, refusing one over `limit` bytes before reading it when it says so,
    and one that takes longer than `time_limit` seconds to arrive (a slow client, byte by byte,
    would otherwise hold the request open as long as it likes)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if not value.isdigit():
                raise BadRequest("Content-Length is not a number")
            if int(value) > limit:
                raise PayloadTooLarge(f"request body exceeds {limit} bytes")
    try:
        async with asyncio.timeout(time_limit):
            return await _read(receive, limit)
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within {time_limit:g} s") from None


async def _read(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest("client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class BodyLimitMiddleware:
    """Reads each request body under `limit` bytes and `timeout` seconds before the app sees
    it (413 or 408 otherwise)."""

    def __init__(self, app: ASGIApp, *, limit: int, timeout: float | None = None) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(scope, receive, self.limit, self.timeout)
        except (BadRequest, PayloadTooLarge, RequestTimeout) as problem:
            response = render_problem(problem, instance=scope.get("path"))
            await response(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # what follows the body: a disconnect, eventually

        await self.app(scope, replay, send)
