"""Request bodies under a size cap: read once, 413 past the limit, replayed to the app.

The time a body may take is the server's to bound (`narthex.common.server`: 408 past
`body_timeout`), for every route however it reads its body."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from narthex.common.errors import BadRequest, PayloadTooLarge, send_error

__all__ = ["BodyLimitMiddleware", "read_body"]


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole body, refusing one over `limit` bytes before reading it when it says so."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if not value.isdigit():
                raise BadRequest("Content-Length is not a number")
            if int(value) > limit:
                raise PayloadTooLarge(f"request body exceeds {limit} bytes")
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
            return b"".join(chunks)


class BodyLimitMiddleware:
    """Reads each request body under `limit` before the app sees it (413 otherwise)."""

    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(scope, receive, self.limit)
        except (BadRequest, PayloadTooLarge) as problem:
            await send_error(problem, scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # what follows the body: a disconnect, eventually

        await self.app(scope, replay, send)
