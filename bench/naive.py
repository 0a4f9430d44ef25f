"""Naive ASGI reverse proxies (FastAPI or bare ASGI, on httpx or aiohttp) under uvicorn."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Literal

import aiohttp
import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from bench._loop import uvicorn_loop

Headers = list[tuple[str, str]]
# (method, url, headers, body) -> (status, headers, body); the one thing a client backend provides.
Forward = Callable[[str, str, Headers, bytes], Awaitable[tuple[int, Headers, bytes]]]
ClientKind = Literal["httpx", "aiohttp"]
AppKind = Literal["fastapi", "asgi"]

HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding"}
    | {"upgrade", "host", "content-length"}
)
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@asynccontextmanager
async def open_forward(kind: ClientKind) -> AsyncIterator[Forward]:
    """One shared client for the process lifetime, wrapped as a ``Forward``."""
    if kind == "httpx":
        # httpx keeps only 20 idle connections by default; with 64 load connections that churns
        # upstream sockets, which would measure a misconfiguration rather than httpx itself.
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:

            async def forward_httpx(
                method: str, url: str, headers: Headers, body: bytes
            ) -> tuple[int, Headers, bytes]:
                resp = await client.request(method, url, headers=headers, content=body)
                # .content is already decoded, so its Content-Encoding no longer applies.
                out = [
                    (k, v)
                    for k, v in resp.headers.multi_items()
                    if k not in HOP and k != "content-encoding"
                ]
                return resp.status_code, out, resp.content

            yield forward_httpx
    else:
        async with aiohttp.ClientSession(auto_decompress=False) as session:

            async def forward_aiohttp(
                method: str, url: str, headers: Headers, body: bytes
            ) -> tuple[int, Headers, bytes]:
                async with session.request(
                    method, url, headers=headers, data=body, allow_redirects=False
                ) as resp:
                    out = [(k, v) for k, v in resp.headers.items() if k.lower() not in HOP]
                    return resp.status, out, await resp.read()

            yield forward_aiohttp


class _Holder:
    """The live ``Forward``; set at lifespan startup because clients need a running loop."""

    forward: Forward | None = None

    def get(self) -> Forward:
        assert self.forward is not None, "lifespan has not started"
        return self.forward


def build_fastapi(upstream: str, client: ClientKind) -> FastAPI:
    """The catch-all FastAPI proxy most people would write first."""
    holder = _Holder()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with open_forward(client) as forward:
            holder.forward = forward
            yield

    app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)

    @app.api_route("/{path:path}", methods=METHODS)
    async def proxy(request: Request) -> Response:
        query = request.url.query
        url = upstream + request.url.path + (f"?{query}" if query else "")
        headers = [(k, v) for k, v in request.headers.items() if k not in HOP]
        status, out, body = await holder.get()(request.method, url, headers, await request.body())
        response = Response(content=body, status_code=status)
        for k, v in out:
            response.headers.append(k, v)
        return response

    return app


def build_asgi(upstream: str, client: ClientKind) -> ASGIApp:
    """A bare ASGI callable: no routing, no Request objects; the ceiling for an ASGI proxy."""
    holder = _Holder()
    stack = AsyncExitStack()

    async def lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                holder.forward = await stack.enter_async_context(open_forward(client))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await stack.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope["query_string"]
        url = upstream + raw_path.decode("latin-1")
        if query:
            url += "?" + query.decode("latin-1")
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k.decode("latin-1") not in HOP
        ]
        status, out, body = await holder.get()(scope["method"], url, headers, b"".join(chunks))
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in out]
        raw.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--app", choices=["fastapi", "asgi"], default="fastapi")
    parser.add_argument("--client", choices=["httpx", "aiohttp"], default="httpx")
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:9000")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    upstream: str = args.upstream.rstrip("/")
    build = build_fastapi if args.app == "fastapi" else build_asgi
    uvicorn.run(
        build(upstream, args.client),
        host=args.host,
        port=args.port,
        loop=uvicorn_loop(),
        http="httptools",
        access_log=False,
        log_level="warning",
        workers=1,
    )


if __name__ == "__main__":
    main()
