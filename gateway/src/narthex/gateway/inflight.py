"""Requests each tenant has in flight through this gateway: capped, so that no tenant can hold
every pooled connection to an upstream."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from narthex.gateway.errors import TooManyInFlight


@dataclass(slots=True)
class _Slots:
    held: int = 1
    # Requests waiting for a slot, first come first served; a freed slot passes straight
    # to the first of them.
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)


class TenantInFlight:
    """At most `limit` requests of one tenant past this point at once.

    The connections to each upstream are one pool shared by every tenant, and a rate
    limit bounds requests per second, not how long they last: against a slow upstream a
    tenant within its rate could hold them all, and everyone else would wait for one.
    Past its `limit` a tenant's request waits for one of its own slots (holding no
    connection meanwhile) as long as any request may wait for a pooled connection
    (`wait`), then gets a 429 with Retry-After, before anything is charged. A client
    that briefly has a few more requests out than its share (reconnecting while its old
    requests finish, say) is slowed, not refused.

    On the request path: `try_acquire` (a dict lookup and a count, no await), and
    `wait_for_slot` only when the tenant is at its limit.
    """

    def __init__(self, limit: int, wait: float) -> None:
        self.limit = limit
        self.wait = wait
        self._slots: dict[str, _Slots] = {}

    def try_acquire(self, tenant: str) -> bool:
        slots = self._slots.get(tenant)
        if slots is None:
            self._slots[tenant] = _Slots()
            return True
        if slots.held < self.limit and not slots.waiters:
            slots.held += 1
            return True
        return False

    async def wait_for_slot(self, tenant: str) -> None:
        """Once `try_acquire` said no: wait for a slot, or raise `TooManyInFlight`."""
        slots = self._slots[tenant]
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        slots.waiters.append(waiter)
        try:
            async with asyncio.timeout(self.wait):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.release(tenant)  # handed a slot just as we gave up: pass it on
            else:
                slots.waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise TooManyInFlight(
                    f"at most {self.limit} requests of a tenant in flight at once",
                    headers={"Retry-After": "1"},
                ) from None
            raise

    def release(self, tenant: str) -> None:
        slots = self._slots[tenant]
        while slots.waiters:
            waiter = slots.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot changes hands; the count stays
                return
        slots.held -= 1
        if slots.held == 0:
            del self._slots[tenant]
