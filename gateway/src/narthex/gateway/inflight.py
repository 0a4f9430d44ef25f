"""Requests each tenant has in flight through this gateway: capped, so that no tenant can hold
every pooled connection to an upstream."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from narthex.gateway.ratelimit import RateLimited


class TooManyInFlight(RateLimited):
    type_slug, title = "too-many-in-flight", "Too many requests in flight"


@dataclass
class _Slots:
    semaphore: asyncio.Semaphore
    users: int = field(default=0)  # holders and waiters: the entry goes when none is left


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
    """

    def __init__(self, limit: int, wait: float) -> None:
        self.limit = limit
        self.wait = wait
        self._slots: dict[str, _Slots] = {}

    async def acquire(self, tenant: str) -> None:
        slots = self._slots.get(tenant)
        if slots is None:
            slots = self._slots[tenant] = _Slots(asyncio.Semaphore(self.limit))
        slots.users += 1
        try:
            if not slots.semaphore.locked():
                await slots.semaphore.acquire()  # free: returns at once
                return
            async with asyncio.timeout(self.wait):
                await slots.semaphore.acquire()
        except TimeoutError:
            self._leave(tenant, slots)
            raise TooManyInFlight(
                f"at most {self.limit} requests of a tenant in flight at once",
                headers={"Retry-After": "1"},
            ) from None
        except BaseException:
            self._leave(tenant, slots)
            raise

    def release(self, tenant: str) -> None:
        slots = self._slots[tenant]
        slots.semaphore.release()
        self._leave(tenant, slots)

    def _leave(self, tenant: str, slots: _Slots) -> None:
        slots.users -= 1
        if slots.users == 0:
            del self._slots[tenant]
