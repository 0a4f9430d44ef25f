"""The Python floor: narthex's HTTP server (uvicorn, its guarded protocol) answering from memory.

No upstream, no checks, no middleware: what any edge written on this server spends per request
before it does anything, for the edge table of `make bench-peers`.
"""

from __future__ import annotations

import argparse

from starlette.types import Receive, Scope, Send

from bench.upstream import BODY
from narthex.common.serve import run_server
from narthex.common.server import ConnectionLimits

_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))],
}
_BODY = {"type": "http.response.body", "body": BODY}


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        await send(_START)
        await send(_BODY)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    run_server(app, args.host, args.port, ConnectionLimits(), lifespan="off")


if __name__ == "__main__":
    main()
