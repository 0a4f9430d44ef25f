"""A pipelined Redis connection for the limiter's hot path: one socket, many callers in flight.

redis-py spends about 120 us of CPU per command on its pool, connection and parser layers,
which at the edge's request rates is most of a core. The limiter sends one small command
per request, so this client does only that: it encodes the command, queues a future, and
lets hiredis parse the replies, which come back in order. Concurrent callers share the
socket (Redis answers one connection's commands in order anyway), and commands issued in
the same event-loop turn go out in one write.

Failure semantics are the limiter's: a reply that takes longer than `timeout` means the
server is not answering, so the connection is dropped and every caller waiting on it gets
`TimeoutError`; a lost connection fails its callers with `ConnectionError`; the next call
connects again. Errors are redis-py's exception classes, so callers handle one family.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis
from redis.exceptions import ConnectionError, NoScriptError, ResponseError

__all__ = ["Endpoint", "PipelinedRedis"]

Arg = str | bytes | int | float


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a Redis server is, from a `redis://[[user]:password@]host[:port][/db]` URL."""

    host: str
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise ValueError(f"only redis:// URLs are supported here, not {parts.scheme}://")
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"the database in a Redis URL is a number, not {path!r}")
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            db=int(path or 0),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
        )


def encode(args: tuple[Arg, ...]) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        else:  # int, float: repr() round-trips a float exactly
            data = repr(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _error(reply: hiredis.ReplyError) -> ResponseError:
    message = str(reply)
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    return ResponseError(message)


class _Connection(asyncio.Protocol):
    """One socket and the callers waiting on it, in the order their commands were sent."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop = loop
        self._timeout = timeout
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._outgoing: list[bytes] = []
        self._watchdog: asyncio.TimerHandle | None = None
        self._answered = 0  # replies parsed so far; the watchdog checks it moves
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP transport, though uvloop's do not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)

    def send(self, command: bytes) -> asyncio.Future[Any]:
        if self.closed:
            raise ConnectionError("connection to Redis is closed")
        future: asyncio.Future[Any] = self._loop.create_future()
        if not self._outgoing:
            self._loop.call_soon(self._flush)
        self._outgoing.append(command)
        self._waiting.append(future)
        if self._watchdog is None:
            self._arm(self._answered)
        return future

    def _flush(self) -> None:
        if self._transport is not None and not self.closed and self._outgoing:
            self._transport.write(b"".join(self._outgoing))
        self._outgoing.clear()

    def _arm(self, answered: int) -> None:
        self._watchdog = self._loop.call_later(self._timeout, self._check, answered)

    def _check(self, answered: int) -> None:
        # One timer per connection rather than one per call: if no reply at all arrived
        # for a whole period while callers waited, the server is not answering.
        self._watchdog = None
        if not self._waiting:
            return
        if self._answered == answered:
            # Not yet: a loop running late fires its timers before it reads the sockets,
            # so a reply may be sitting unread. Two hops of call_soon land after the next
            # I/O poll on both loops (uvloop runs them before its poll, asyncio after).
            self._loop.call_soon(self._loop.call_soon, self._verdict, answered)
            return
        self._arm(self._answered)

    def _verdict(self, answered: int) -> None:
        if self.closed or not self._waiting:
            return
        if self._answered != answered:
            if self._watchdog is None:
                self._arm(self._answered)
            return
        self._fail(TimeoutError(f"Redis did not answer within {self._timeout} s"))
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            self._answered += 1
            future = self._waiting.popleft()
            if future.done():  # its caller was cancelled; the reply is not wanted
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(_error(reply))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"connection to Redis lost: {exc or 'closed by server'}"))

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(exc)
                # Callers that were cancelled never read it; do not log it as unretrieved.
                future.exception()

    def close(self) -> None:
        self._fail(ConnectionError("connection to Redis closed"))
        if self._transport is not None:
            self._transport.close()


class PipelinedRedis:
    """`execute_command(*args)` over one lazily (re)connected, pipelined connection."""

    def __init__(
        self, endpoint: Endpoint, *, timeout: float = 0.5, connect_timeout: float = 0.5
    ) -> None:
        self.endpoint = endpoint
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None

    @classmethod
    def from_url(cls, url: str, **options: float) -> PipelinedRedis:
        return cls(Endpoint.from_url(url), **options)

    async def execute_command(self, *args: Arg) -> Any:
        connection = self._connection
        if connection is None or connection.closed:
            connection = await self._connect()
        return await connection.send(encode(args))

    async def _connect(self) -> _Connection:
        # Callers arriving while a connection is being made wait for that one.
        task = self._connecting
        if task is None or task.done():
            task = self._connecting = asyncio.ensure_future(self._open())
            # Retrieved here in case every caller waiting on it was cancelled.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            return await asyncio.shield(task)
        finally:
            if task.done() and self._connecting is task:
                self._connecting = None

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        ep = self.endpoint
        async with asyncio.timeout(self._connect_timeout):
            _, connection = await loop.create_connection(
                lambda: _Connection(loop, self._timeout), ep.host, ep.port
            )
            setup: list[tuple[Arg, ...]] = []
            if ep.password is not None:
                user = (ep.username,) if ep.username else ()
                setup.append(("AUTH", *user, ep.password))
            if ep.db:
                setup.append(("SELECT", ep.db))
            try:
                for command in setup:
                    await connection.send(encode(command))
            except BaseException:
                connection.close()
                raise
        self._connection = connection
        return connection

    async def aclose(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        if self._connection is not None:
            self._connection.close()
            self._connection = None
