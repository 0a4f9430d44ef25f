"""A base for real test servers on an ephemeral port that clean up every connection they accept."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Self, TypeVar

__all__ = ["LoopbackServer", "in_own_thread"]


class LoopbackServer:
    """An `asyncio` server on `host`, port 0; subclasses say what one connection gets.

    `handle` runs once per accepted connection, in a task of its own; when it returns
    (or the peer goes away) the connection is closed. Leaving the server cancels every
    handler still running and waits for it, so no task or socket outlives the test.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one connection; the base closes `writer` once this returns."""
        raise NotImplementedError

    @property
    def port(self) -> int:
        """The port listened on; 0 before `start()` (kept after `close()` for messages)."""
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # Handlers may sleep or wait on an idle keep-alive connection: they end only when
        # cancelled. A connection accepted just before `close` starts its handler late,
        # so go round until none is left.
        while self._handlers:
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
        await server.wait_closed()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self.handle(reader, writer)
        # A client hanging up mid-request, or `close` cancelling us, just ends the
        # connection: neither is the test's failure, and an error escaping here would
        # only be logged by the event loop, far from any test.
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._handlers.discard(task)
            if not writer.is_closing():
                writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()


S = TypeVar("S", bound=LoopbackServer)


@contextlib.contextmanager
def in_own_thread(server: S) -> Iterator[S]:
    """`server` on an event loop of its own thread, so that the test's loop and blocking
    calls in the test (process start-up) never stall it."""
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    started.wait(10)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
