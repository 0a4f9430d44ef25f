"""The HTTP/1.1 server protocol every service runs: uvicorn's httptools protocol plus the read
deadlines and caps it lacks, so that slow or malformed clients cannot hold connections.

uvicorn bounds the idle time between requests (`timeout_keep_alive`) but not the time a
client takes to send a request, nor the size of its head: a client that opens a connection
and sends nothing, or a header or a body a byte at a time (slowloris), or an endless header
(httptools has no cap), holds the connection and its memory for as long as it likes. This
subclass adds, per connection:

- a head deadline: the request line and headers must be complete within `header_timeout`
  seconds of the connection opening (first request) or of the request's first byte (later
  requests on a kept-alive connection; the idle time before it is uvicorn's keep-alive
  timeout). Past it: 408 and close (a silent close if nothing was sent at all);
- a head size cap: more than `max_header_bytes` without the head ending: 431 and close;
- a body deadline: a body must be complete within `body_timeout` of its head. Past it:
  408 and close if nothing was answered yet (the app then reads a disconnect and its
  answer goes nowhere), a plain close otherwise (a body still trickling in after its
  answer, one the app never read or refused before reading);
- a connection cap: past `max_connections` open connections, a new one is answered 503
  with `Retry-After` and closed at once, before anything is read or parsed.

It also sends a response whose length is known in one write rather than two: uvicorn
writes the head and the body separately, and each write is a send syscall (on loopback,
the receiver's TCP path too): 4 writes a proxied gateway request before, 3 after.

Living in the server, the deadlines cover every route of every service, however the app
reads its body, and cost next to nothing: a request only moves a due time (one
`loop.time()`), and a connection's one timer, when it fires early, re-arms itself for the
current due time: on a busy kept-alive connection that is once per deadline, not once per
request. (`asyncio.timeout` around an app's body read costs 8 us a request under uvloop,
some 4% of a gateway request; a `call_later` and `cancel` per request, 2 us.) A body that
arrives with its head arms nothing at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from narthex.common.errors import PROBLEM_BASE, PROBLEM_MEDIA_TYPE

__all__ = ["ConnectionLimits", "GuardedHttpToolsProtocol", "guarded_protocol"]

Phase = Literal["head", "body"] | None


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
_BODY_TIMEOUT = _answer(
    408, "Request Timeout", "request-timeout", "Request body not received in time"
)
_HEAD_TOO_LARGE = _answer(
    431, "Request Header Fields Too Large", "header-too-large", "Request head too large"
)
_BUSY = _answer(
    503, "Service Unavailable", "too-many-connections", "Too many connections", "retry-after: 1\r\n"
)


class _OneWrite:
    """The transport as one request's cycle sees it: a response head with a Content-Length
    waits for the body's first bytes and leaves with them in one write.

    Only a head with a length is held (its body follows at once: the app has it); a
    chunked head, a HEAD's and a 204's go out as they come, so a stream's head is never
    late. Whatever ends the response without body bytes (HEAD, a close) flushes it first.
    """

    __slots__ = ("_cycle", "_head", "_on_response", "_started", "_transport")

    def __init__(self, transport: asyncio.Transport, cycle: RequestResponseCycle) -> None:
        self._transport = transport
        self._cycle = cycle
        self._head: bytes | None = None
        self._started = False  # the head went through write() already
        self._on_response: Callable[[], None] = cycle.on_response
        cycle.on_response = self._completed

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._transport.write(head + data)
            return
        cycle = self._cycle
        if not self._started and cycle.response_started:
            self._started = True  # this is the head (a 100 Continue comes before the start)
            if cycle.chunked_encoding is False and cycle.scope["method"] != "HEAD":
                self._head = data
                return
        self._transport.write(data)

    def _flush(self) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._transport.write(head)

    def _completed(self) -> None:
        self._flush()
        self._on_response()

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` with head and body deadlines, a head size cap, a connection cap."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._admitted = False
        self._phase: Phase = None  # what the deadline is for
        self._due = 0.0  # loop time
        self._timer: asyncio.TimerHandle | None = None
        self._in_body = False  # the parser is inside a request's body
        self._head_bytes = 0

    # -- connection ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            transport.write(_BUSY)
            transport.close()
            return
        self._admitted = True
        super().connection_made(transport)
        self._expect("head", self.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._admitted:
            return
        self._phase = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._admitted or self.parser is None:
            return
        reading_head = self._phase == "head"
        super().data_received(data)
        if self._phase == "head":
            # Counted from the read after the one a head began in: a pipelined head that
            # starts behind a large body is not charged for the body's bytes.
            if reading_head:
                self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._close_with(_HEAD_TOO_LARGE)
        elif self._in_body and self._phase is None:
            # The head is in and the body is not: from now on it has body_timeout.
            self._expect("body", self.limits.body_timeout)

    # -- parser callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        if self._phase != "head":  # the first request keeps the connection's deadline
            self._expect("head", self.limits.header_timeout)

    def on_headers_complete(self) -> None:
        self._phase = None
        self._in_body = True
        previous = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle is not previous:  # not an upgrade: a new request
            cycle.transport = _OneWrite(self.transport, cycle)  # type: ignore[assignment]

    def on_message_complete(self) -> None:
        self._in_body = False
        if self._phase == "body":
            self._phase = None
        super().on_message_complete()

    # -- the deadline --------------------------------------------------------------------

    def _expect(self, phase: Phase, seconds: float) -> None:
        self._phase = phase
        self._due = self.loop.time() + seconds
        if self._timer is None:
            self._timer = self.loop.call_at(self._due, self._check)

    def _check(self) -> None:
        self._timer = None
        if self._phase is None or self.transport.is_closing():
            return
        if self.loop.time() < self._due:  # moved on since: wait for the current due time
            self._timer = self.loop.call_at(self._due, self._check)
            return
        if self._phase == "head":
            self._head_timed_out()
        else:
            self._body_timed_out()

    def _head_timed_out(self) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # The next request's head trickles in while this one is being answered
            # (pipelining): finish this answer, then close.
            cycle.keep_alive = False
            self._phase = None
            return
        if self._head_bytes:
            self._close_with(_HEAD_TIMEOUT)
        else:
            self.transport.close()  # it never said anything: nothing to answer

    def _body_timed_out(self) -> None:
        cycle = self.cycle
        if cycle is None or cycle.response_started or self.pipeline:
            # Answered already (the rest of the body was being dropped), or behind
            # pipelined requests: nothing can be said in order any more.
            self.transport.close()
            return
        # The app is waiting for the body: it reads a disconnect from now on, and what it
        # sends is dropped, so the 408 is the only answer on the wire.
        cycle.disconnected = True
        cycle.message_event.set()
        self._close_with(_BODY_TIMEOUT)

    def _close_with(self, answer: bytes) -> None:
        self._phase = None
        if not self.transport.is_closing():
            self.transport.write(answer)
            self.transport.close()


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedHttpToolsProtocol]:
    """The protocol class to give uvicorn (`http=`), with these limits."""
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"limits": limits})
