"""The HTTP/1.1 server protocol every service runs: uvicorn's httptools protocol plus the read
deadlines and caps it lacks, so that slow or malformed clients cannot hold connections.

uvicorn bounds the idle time between requests (`timeout_keep_alive`) but not the time a
client takes to send a request's head, nor its size: a client that opens a connection and
sends nothing, or a header a byte at a time (slowloris), or an endless header, holds the
connection and its memory for as long as it likes. This subclass adds, per connection:

- a head deadline: the request line and headers must be complete within `header_timeout`
  seconds of the connection opening (first request) or of the request's first byte (later
  requests on a kept-alive connection; the idle time before it is uvicorn's keep-alive
  timeout). Past it: 408 and close (a silent close if nothing was sent at all);
- a head size cap: more than `max_header_bytes` without the head ending: 431 and close;
- a drain deadline: a body still arriving after its response was sent (one the app never
  read, or refused with 413 before reading) must end within `body_timeout`, or the
  connection is closed. A body the app reads is bounded by `narthex.common.body.read_body`;
- a connection cap: past `max_connections` open connections, a new one is answered 503
  with `Retry-After` and closed at once, before anything is read or parsed.

Timers are uvicorn's own kind (`loop.call_later`), one per request at most.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from narthex.common.errors import PROBLEM_BASE, PROBLEM_MEDIA_TYPE

__all__ = ["ConnectionLimits", "GuardedHttpToolsProtocol", "guarded_protocol"]


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_header_bytes: int = 64 << 10
    max_connections: int = 2048


def _answer(status: int, reason: str, slug: str, title: str, extra: str = "") -> bytes:
    """A complete response that closes the connection, in the problem+json envelope."""
    body = orjson.dumps({"type": PROBLEM_BASE + slug, "title": title, "status": status})
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: {PROBLEM_MEDIA_TYPE}\r\n"
        f"content-length: {len(body)}\r\n{extra}connection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


_HEAD_TIMEOUT = _answer(
    408, "Request Timeout", "request-timeout", "Request head not received in time"
)
_HEAD_TOO_LARGE = _answer(
    431, "Request Header Fields Too Large", "header-too-large", "Request head too large"
)
_BUSY = _answer(
    503, "Service Unavailable", "too-many-connections", "Too many connections", "retry-after: 1\r\n"
)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` with head and drain deadlines, a head size cap, a connection cap."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._admitted = False
        self._in_head = False
        self._head_bytes = 0
        self._deadline: asyncio.TimerHandle | None = None

    # -- connection ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            transport.write(_BUSY)
            transport.close()
            return
        self._admitted = True
        super().connection_made(transport)
        self._in_head = True
        self._arm(self.limits.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._admitted:
            return
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._admitted or self.parser is None:
            return
        super().data_received(data)
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes and not self.transport.is_closing():
                self._disarm()
                self.transport.write(_HEAD_TOO_LARGE)
                self.transport.close()

    # -- parser callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        if self._deadline is None:  # the first request keeps the deadline of the connection
            self._arm(self.limits.header_timeout, self._head_timed_out)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        if self._deadline is not None and not self._in_head:
            self._disarm()  # a drain deadline: the body has ended
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        cycle = self.cycle
        if cycle.more_body and not self.transport.is_closing() and self._deadline is None:
            # Answered before its body ended: the rest is read and dropped, for so long.
            self._arm(self.limits.body_timeout, self._drain_timed_out)

    # -- deadlines -----------------------------------------------------------------------

    def _arm(self, delay: float, callback: Any) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # The next request's head trickles in while this one is being answered
            # (pipelining): finish this answer, then close.
            cycle.keep_alive = False
            return
        if self._head_bytes:
            self.transport.write(_HEAD_TIMEOUT)
        self.transport.close()

    def _drain_timed_out(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedHttpToolsProtocol]:
    """The protocol class to give uvicorn (`http=`), with these limits."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})
