"""One call in flight per key: concurrent callers for the same key share its result."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

V = TypeVar("V")


class SingleFlight(Generic[V]):
    """A burst of requests for one tenant or key makes one upstream call, not one each.

    The call runs as its own task and callers wait on it shielded, so a caller that is
    cancelled (a client hanging up) does not cancel the call the others are waiting for.
    """

    def __init__(self) -> None:
        self._calls: dict[str, asyncio.Future[V]] = {}

    async def run(self, key: str, call: Callable[[], Awaitable[V]]) -> V:
        pending = self._calls.get(key)
        if pending is None:
            pending = asyncio.ensure_future(call())
            self._calls[key] = pending
            pending.add_done_callback(lambda _: self._calls.pop(key, None))
        return await asyncio.shield(pending)
