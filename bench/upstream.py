"""Trivial keep-alive HTTP upstream: any method and path gets the same ~60-byte JSON body."""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import cast

import httptools

from bench._loop import new_event_loop

BODY = b'{"object":"list","data":[{"id":"bench-model","ready":true}]}'
_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % len(BODY)
# Responses are prebuilt bytes: the upstream must cost far less than any proxy in front of it,
# otherwise the benchmark measures the upstream instead of the proxy.
KEEP_ALIVE = _HEAD + b"\r\n" + BODY
CLOSE = _HEAD + b"Connection: close\r\n\r\n" + BODY


class _Upstream(asyncio.Protocol):
    """One connection; httptools does the parsing, the callbacks only answer."""

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not registered subclasses of asyncio.Transport: cast, not check.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.close()

    def on_message_complete(self) -> None:
        if self._transport is None:
            return
        if self._parser.should_keep_alive():
            self._transport.write(KEEP_ALIVE)
        else:
            self._transport.write(CLOSE)
            self._transport.close()


async def serve(host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(_Upstream, host, port, backlog=1024)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
