"""Background loops: a coroutine run now and then every interval, for as long as its owner lives."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog

log = structlog.get_logger("narthex.background")


@contextlib.asynccontextmanager
async def every(
    interval: float, fn: Callable[[], Awaitable[object]], *, name: str
) -> AsyncIterator[None]:
    """Run `fn` once (awaited: its first result is in place when this enters), then every
    `interval` seconds in a task of its own, cancelled on exit.

    A failing run is logged and the loop goes on: the next run may succeed, and the
    state the loop maintains keeps its last good value meanwhile.
    """

    async def run_once() -> None:
        try:
            await fn()
        except Exception as exc:
            log.warning("background run failed", loop=name, error=repr(exc))

    async def forever() -> None:
        while True:
            await asyncio.sleep(interval)
            await run_once()

    await run_once()
    task = asyncio.create_task(forever(), name=f"narthex:{name}")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
