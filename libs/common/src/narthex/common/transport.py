"""The wire under every ServiceClient: keep-alive HTTP/1.1 on httptools, as an httpx transport."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import httptools
import httpx

# Why not httpx's own transport or aiohttp's client: measured on the gateway's hot
# path, httpcore pays a failed `import sniffio` and several locks per request and its
# pool collapses past ~32 concurrent connections (encode/httpx#3215): ~0.05x of a bare
# aiohttp proxy. aiohttp's client is sound but alone costs ~80 us of CPU per call (URL
# objects, multidicts, signals, timers), which left no room for tracing, metrics and
# the breaker under the 0.8x target. Internal calls are plain HTTP/1.1 between our own
# services (TLS is the mesh's job), so the client they need is small: this one writes a
# request, parses the answer with httptools (the parser uvicorn uses), and keeps the
# connection for the next call. Callers still see httpx's API and exceptions.

# Framing and connection management belong to this hop, never to the caller.
_OWN_HEADERS = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection"})
_BODYLESS_STATUS = frozenset({204, 304})
DEFAULT_MAX_RESPONSE_BYTES = 64 << 20


class ResponseTooLarge(httpx.RemoteProtocolError):
    """The upstream's answer is larger than this transport will buffer."""


@dataclass(frozen=True, slots=True)
class Exchange:
    """A buffered upstream response: what a proxy needs, nothing more."""

    status_code: int
    headers: list[tuple[bytes, bytes]]
    content: bytes


class _Connection(asyncio.Protocol):
    """One upstream connection: one request in flight at a time."""

    def __init__(self, max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES) -> None:
        self.transport: asyncio.Transport | None = None
        # Its loop, once: get_running_loop() is a getpid syscall a call (CPython 3.11).
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Exchange] | None = None
        self.reusable = False
        self.idle_since = 0.0
        self.max_response_bytes = max_response_bytes
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0
        self._head_only = False
        self._framed = True
        self._interim = False

    # -- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self.transport = None
        if self._status and not self._framed and not self._interim and exc is None:
            # Neither Content-Length nor chunked: the body ends where the connection does.
            self.on_message_complete()
        self._fail(httpx.RemoteProtocolError("upstream closed the connection"))

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return  # failed and closed: what is still in flight is not read
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"malformed response: {exc}"))
            self.close()

    # -- httptools callbacks -------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._status = self.parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:  # we never ask to switch protocols
                self._refuse(httpx.RemoteProtocolError("unexpected 101 Switching Protocols"))
                return
            # 100 Continue, 103 Early Hints...: interim, the answer is still to come.
            self._interim = True
            return
        self.reusable = self.parser.should_keep_alive()
        self._framed = False
        for name, value in self._headers:
            lowered = name.lower()
            if lowered == b"transfer-encoding":
                self._framed = True
            elif lowered == b"content-length":
                self._framed = True
                if value.strip().isdigit() and int(value) > self.max_response_bytes:
                    self._refuse(ResponseTooLarge(self._too_large()))
                    return
        if self._head_only or status in _BODYLESS_STATUS:
            # httptools cannot know a HEAD answer has no body; finish here, and do not
            # reuse a connection whose parser state we cut short.
            self.reusable = self.reusable and not self._head_only
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self.max_response_bytes:
            self._refuse(ResponseTooLarge(self._too_large()))
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._interim:
            # The answer is still to come: its own status, headers and body, afresh.
            self._status, self._headers, self._body, self._size = 0, [], [], 0
            self._framed, self._interim = True, False
            return
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(Exchange(self._status, self._headers, b"".join(self._body)))

    # -- use ------------------------------------------------------------------------------
    def _too_large(self) -> str:
        return f"upstream answer larger than {self.max_response_bytes} bytes"

    def _refuse(self, exc: Exception) -> None:
        """Fail the request and drop the connection: the rest of the answer is unwanted."""
        self._fail(exc)
        self._body = []
        self.close()

    def _fail(self, exc: Exception) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    async def exchange(self, request: bytes, body: bytes, head_only: bool) -> Exchange:
        assert self.transport is not None
        self._status, self._headers, self._body, self._size = 0, [], [], 0
        self._framed, self._interim = True, False
        self._head_only = head_only
        self.reusable = False
        self.waiter = self.loop.create_future()
        self.transport.write(request + body if len(body) < 65536 else request)
        if len(body) >= 65536:
            self.transport.write(body)  # no copy of a large body
        try:
            return await self.waiter
        finally:
            self.waiter = None


class _Pool:
    """Idle connections to one host:port, most recently used first."""

    def __init__(
        self,
        host: str,
        port: int,
        max_connections: int,
        keepalive_expiry: float,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.clock = clock
        self.host = host
        self.port = port
        self.max_response_bytes = max_response_bytes
        self.authority = f"{host}:{port}".encode()
        self.keepalive_expiry = keepalive_expiry
        self.slots = asyncio.Semaphore(max_connections)
        self.idle: deque[_Connection] = deque()

    def _take_idle(self) -> _Connection | None:
        now = self.clock()
        while self.idle:
            conn = self.idle.pop()
            if conn.transport is not None and now - conn.idle_since < self.keepalive_expiry:
                return conn
            conn.close()
        return None

    async def _connect(self, limit: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(limit):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self.max_response_bytes), self.host, self.port
                )
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"connecting to {self.host}:{self.port} timed out") from exc
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        return conn

    async def exchange(
        self,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        timeouts: dict[str, float | None],
    ) -> Exchange:
        # latin-1: one character per byte, as ASGI hands over a raw query string, so
        # the target goes out byte for byte as the caller received it.
        lines = [
            b"%s %s HTTP/1.1\r\nhost: %s\r\n"
            % (method.encode(), target.encode("latin-1"), self.authority)
        ]
        lines.extend(
            name + b": " + value + b"\r\n"
            for name, value in headers
            if name.lower() not in _OWN_HEADERS
        )
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(b"content-length: %d\r\n" % len(body))
        lines.append(b"\r\n")
        request = b"".join(lines)
        total = timeouts.get("total")
        await self._acquire_slot(timeouts.get("pool"))
        try:
            conn = self._take_idle() or await self._connect(timeouts.get("connect"))
            # One timer for the whole try, cancelled on completion: cheaper than
            # asyncio.timeout, which costs more than the rest of this function.
            timer = (
                conn.loop.call_later(total, conn._fail, httpx.ReadTimeout("upstream timed out"))
                if total is not None
                else None
            )
            try:
                response = await conn.exchange(request, body, head_only=method == "HEAD")
            except BaseException:
                conn.close()  # half a response on the wire: never reuse it
                raise
            finally:
                if timer is not None:
                    timer.cancel()
            if conn.reusable:
                conn.idle_since = self.clock()
                self.idle.append(conn)
            else:
                conn.close()
            return response
        finally:
            self.slots.release()

    async def _acquire_slot(self, limit: float | None) -> None:
        slots = self.slots
        if slots._value > 0 and not slots._waiters:
            # The common case, taken as acquire() would take it, without the scan of
            # its waiters that locked() makes with a generator, twice an acquire (3.11).
            slots._value -= 1
            return
        if not slots.locked():
            await slots.acquire()  # no timer needed
            return
        try:
            async with asyncio.timeout(limit):
                await self.slots.acquire()
        except TimeoutError as exc:
            raise httpx.PoolTimeout(f"no free connection to {self.host}:{self.port}") from exc

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


class H1Transport(httpx.AsyncBaseTransport):
    """httpx transport over `_Pool`s (plain HTTP/1.1 only), with a raw `exchange()`."""

    def __init__(
        self,
        *,
        max_connections: int = 200,
        keepalive_expiry: float = 4.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock  # monotonic seconds: how long a connection has been idle
        self._max_connections = max_connections
        self._keepalive_expiry = keepalive_expiry
        self._max_response_bytes = max_response_bytes
        self._pools: dict[tuple[str, int], _Pool] = {}

    def _pool(self, url: httpx.URL) -> _Pool:
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"internal calls are plain http, not {url.scheme}")
        key = (url.host, url.port or 80)
        pool = self._pools.get(key)
        if pool is None:
            pool = _Pool(
                *key,
                self._max_connections,
                self._keepalive_expiry,
                self._max_response_bytes,
                self._clock,
            )
            self._pools[key] = pool
        return pool

    async def exchange(
        self,
        url: httpx.URL,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        timeouts: dict[str, float | None],
    ) -> Exchange:
        """One request to `url`'s host, with `target` (path and query) as given, one
        character per byte (latin-1).

        `timeouts` has `total` (the whole try), `connect` and `pool` (waiting for a free
        connection). Failures are httpx's exceptions (`ResponseTooLarge` is a
        `RemoteProtocolError`), so callers classify them one way.
        """
        return await self._pool(url).exchange(method, target, headers, body, timeouts)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        try:
            body = request.content
        except httpx.RequestNotRead:
            # A streamed body (an async iterator, multipart files): httpx only reads
            # byte content up front; this transport sends bodies whole, so buffer it.
            body = await request.aread()
        try:
            exchange = await self.exchange(
                request.url,
                request.method,
                request.url.raw_path.decode("ascii"),
                request.headers.raw,
                body,
                {
                    "total": timeouts.get("total", timeouts.get("read")),
                    "connect": timeouts.get("connect"),
                    "pool": timeouts.get("pool"),
                },
            )
        except httpx.RequestError as exc:
            exc.request = request
            raise
        return httpx.Response(
            exchange.status_code,
            headers=exchange.headers,
            stream=httpx.ByteStream(exchange.content),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
