"""Request bodies under a size cap, in every service app (their deadline: test_server.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from fastapi import FastAPI
from pydantic import BaseModel
from starlette.types import Message

from narthex.common.app import service_app
from narthex.common.body import read_body
from narthex.common.errors import BadRequest, PayloadTooLarge
from narthex.common.settings import ServiceSettings

BOUND = 10.0  # no test may hang: everything here runs under this


class Item(BaseModel):
    name: str


def scope(method: str = "POST", path: str = "/items", **headers: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }


def trickle(*chunks: bytes) -> Any:
    """A receive() that hands out `chunks` (more to come after each), then a disconnect."""
    pending = list(chunks)

    async def receive() -> Message:
        if pending:
            return {"type": "http.request", "body": pending.pop(0), "more_body": True}
        return {"type": "http.disconnect"}

    return receive


async def test_a_disconnect_and_an_oversized_body_are_refused() -> None:
    with pytest.raises(BadRequest, match="disconnected"):
        await read_body(scope(), trickle(b"{"), 1024)
    with pytest.raises(PayloadTooLarge):
        await read_body(scope(), trickle(b"x" * 600, b"x" * 600), 1024)
    with pytest.raises(PayloadTooLarge):
        await read_body(scope(content_length="1025"), trickle(), 1024)


def demo_app(**settings: Any) -> FastAPI:
    app = service_app(
        ServiceSettings(tracing=False, **settings), title="demo", description="Demo service."
    )

    @app.post("/items")
    async def create_item(item: Item) -> Item:
        return item

    return app


async def call(app: FastAPI, receive: Any, **headers: str) -> tuple[int, dict[str, str], Any]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async with asyncio.timeout(BOUND):
        await app(scope(content_type="application/json", **headers), receive, send)
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    names = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], names, orjson.loads(body)


async def test_every_service_app_caps_the_size_of_a_body() -> None:
    body = orjson.dumps({"name": "x" * 100})

    async def whole() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    status, _, problem = await call(demo_app(max_body_bytes=64), whole)
    assert status == 413
    assert problem["type"].endswith("/payload-too-large")
    status, _, item = await call(demo_app(max_body_bytes=len(body)), whole)
    assert (status, item) == (200, {"name": "x" * 100})
