"""Baseline: the dozen-line aiohttp reverse proxy that every other target is measured against."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from bench._loop import new_event_loop

# Hop-by-hop headers plus the framing ones aiohttp recomputes on each side.
HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding"}
    | {"upgrade", "host", "content-length"}
)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def build_app(upstream: str) -> web.Application:
    """The whole proxy: one shared session, forward everything, buffer the (small) reply."""

    async def proxy(request: web.Request) -> web.Response:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP]
        async with request.app[SESSION].request(
            request.method,
            upstream + request.raw_path,
            headers=headers,
            data=await request.read(),
            allow_redirects=False,
        ) as resp:
            body = await resp.read()
            out = [(k, v) for k, v in resp.headers.items() if k.lower() not in HOP]
            return web.Response(status=resp.status, headers=out, body=body)

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        # auto_decompress off: the body is passed through untouched with its Content-Encoding.
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            app[SESSION] = session
            yield

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:9000")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(
        build_app(args.upstream.rstrip("/")),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        loop=new_event_loop(),
    )


if __name__ == "__main__":
    main()
