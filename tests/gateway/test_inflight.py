"""The per-tenant cap on requests in flight: slots, waiting for one, and forgetting idle tenants."""

from __future__ import annotations

import asyncio

import pytest

from narthex.gateway.errors import TooManyInFlight
from narthex.gateway.inflight import TenantInFlight


async def acquire(slots: TenantInFlight, tenant: str) -> None:
    if not slots.try_acquire(tenant):
        await slots.wait_for_slot(tenant)


async def test_a_tenant_at_its_cap_waits_and_others_pass() -> None:
    slots = TenantInFlight(2, wait=5.0)
    await acquire(slots, "a")
    await acquire(slots, "a")
    waiting = asyncio.create_task(acquire(slots, "a"))
    await asyncio.sleep(0)
    assert not waiting.done()
    assert slots.try_acquire("b")  # another tenant: its own slots
    slots.release("a")
    await asyncio.wait_for(waiting, 1.0)  # the freed slot went to the waiter
    assert not slots.try_acquire("a")  # still two held
    for tenant in ("a", "a", "b"):
        slots.release(tenant)
    assert slots._slots == {}  # idle tenants are forgotten


async def test_waiters_are_served_in_order_and_newcomers_queue_behind_them() -> None:
    slots = TenantInFlight(1, wait=5.0)
    await acquire(slots, "a")
    order: list[int] = []

    async def waits(n: int) -> None:
        await acquire(slots, "a")
        order.append(n)

    first = asyncio.create_task(waits(1))
    second = asyncio.create_task(waits(2))
    await asyncio.sleep(0)
    slots.release("a")
    await asyncio.sleep(0)
    assert not slots.try_acquire("a")  # the slot went to the first waiter, not to us
    slots.release("a")
    await asyncio.wait_for(asyncio.gather(first, second), 1.0)
    assert order == [1, 2]
    slots.release("a")
    assert slots._slots == {}


async def test_a_wait_longer_than_allowed_is_a_429_and_leaves_no_trace() -> None:
    slots = TenantInFlight(1, wait=0.01)
    await acquire(slots, "a")
    with pytest.raises(TooManyInFlight) as caught:
        await acquire(slots, "a")
    assert caught.value.status == 429
    assert caught.value.headers == {"Retry-After": "1"}
    slots.release("a")
    assert slots._slots == {}


async def test_a_cancelled_waiter_gives_nothing_away() -> None:
    slots = TenantInFlight(1, wait=5.0)
    await acquire(slots, "a")
    waiting = asyncio.create_task(acquire(slots, "a"))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    slots.release("a")
    assert slots._slots == {}
    await acquire(slots, "a")  # the slot is whole again
    slots.release("a")
    assert slots._slots == {}
