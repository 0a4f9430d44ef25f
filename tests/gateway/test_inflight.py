"""The per-tenant cap on requests in flight: slots, waiting for one, and forgetting idle tenants."""

from __future__ import annotations

import asyncio

import pytest

from narthex.gateway.inflight import TenantInFlight, TooManyInFlight


async def test_a_tenant_at_its_cap_waits_and_others_pass() -> None:
    slots = TenantInFlight(2, wait=5.0)
    await slots.acquire("a")
    await slots.acquire("a")
    waiting = asyncio.create_task(slots.acquire("a"))
    await asyncio.sleep(0)
    assert not waiting.done()
    await slots.acquire("b")  # another tenant: its own slots
    slots.release("a")
    await asyncio.wait_for(waiting, 1.0)  # the freed slot went to the waiter
    for tenant in ("a", "a", "b"):
        slots.release(tenant)
    assert slots._slots == {}  # idle tenants are forgotten


async def test_a_wait_longer_than_allowed_is_a_429_and_leaves_no_trace() -> None:
    slots = TenantInFlight(1, wait=0.01)
    await slots.acquire("a")
    with pytest.raises(TooManyInFlight) as caught:
        await slots.acquire("a")
    assert caught.value.status == 429
    assert caught.value.headers == {"Retry-After": "1"}
    slots.release("a")
    assert slots._slots == {}


async def test_a_cancelled_waiter_gives_nothing_away() -> None:
    slots = TenantInFlight(1, wait=5.0)
    await slots.acquire("a")
    waiting = asyncio.create_task(slots.acquire("a"))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    slots.release("a")
    assert slots._slots == {}
    await slots.acquire("a")  # the slot is whole again
    slots.release("a")
