"""One call in flight per key: concurrent callers for the same key share its result."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from narthex.common.deadline import remaining, unbounded_context
from narthex.common.errors import GatewayTimeout

V = TypeVar("V")


async def _awaited(call: Callable[[], Awaitable[V]]) -> V:
    return await call()


class SingleFlight(Generic[V]):
    """A burst of requests for one tenant or key makes one upstream call, not one each.

    The call runs as its own task and callers wait on it shielded, so a caller that is
    cancelled (a client hanging up) does not cancel the call the others are waiting for;
    and it runs without the first caller's deadline, which a client chooses and which
    must not cut short a result others share. Each caller still waits no longer than
    its own deadline (then 504).
    """

    def __init__(self) -> None:
        self._calls: dict[str, asyncio.Future[V]] = {}

    async def run(self, key: str, call: Callable[[], Awaitable[V]]) -> V:
        pending = self._calls.get(key)
        if pending is None:
            # Outside the first caller's deadline: its result serves every caller.
            pending = asyncio.get_running_loop().create_task(
                _awaited(call), context=unbounded_context()
            )
            self._calls[key] = pending
            pending.add_done_callback(lambda _: self._calls.pop(key, None))
        left = remaining()
        if left == math.inf:
            return await asyncio.shield(pending)
        # The caller waits no longer than its own deadline; the call goes on for the rest.
        try:
            async with asyncio.timeout(max(0.0, left)):
                return await asyncio.shield(pending)
        except TimeoutError:
            raise GatewayTimeout("the request's deadline passed") from None
