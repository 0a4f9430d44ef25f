"""Deadlines: the caller's budget, its floor, and work that must not inherit it."""

from __future__ import annotations

import asyncio
import math

import httpx
import pytest
from fastapi import FastAPI

from narthex.common.app import service_app
from narthex.common.deadline import (
    DEFAULT_FLOOR_MS,
    deadline,
    deadline_at,
    parse_header,
    remaining,
    unbounded_context,
)
from narthex.common.settings import ServiceSettings


@pytest.mark.parametrize(
    ("value", "floor", "seconds"),
    [
        ("1", 100, 0.1),
        ("0", 100, 0.1),
        ("99", 100, 0.1),
        ("100", 100, 0.1),
        ("2500", 100, 2.5),
        ("1", 50, 0.05),
        (None, 100, None),
        ("", 100, None),
        ("-5", 100, None),
        ("1.5", 100, None),
        ("1" * 10, 100, None),
    ],
)
def test_a_callers_deadline_is_never_below_the_floor(
    value: str | None, floor: int, seconds: float | None
) -> None:
    assert parse_header(value, floor) == seconds


def test_the_default_floor_is_what_services_use_unless_configured() -> None:
    assert ServiceSettings().deadline_floor_ms == DEFAULT_FLOOR_MS == 100


async def test_shared_work_runs_without_the_callers_deadline() -> None:
    seen: list[float] = []

    async def shared() -> None:
        seen.append(deadline_at())

    with deadline(0.01):
        assert remaining() <= 0.01
        await asyncio.get_running_loop().create_task(shared(), context=unbounded_context())
        await asyncio.get_running_loop().create_task(shared())
        assert remaining() <= 0.01  # the caller's own is untouched
    assert seen[0] == math.inf
    assert seen[1] != math.inf  # an ordinary task inherits it


def budget_app(floor: int) -> FastAPI:
    app = service_app(
        ServiceSettings(tracing=False, deadline_floor_ms=floor), title="t", description="t"
    )

    @app.get("/left")
    async def left() -> dict[str, float]:
        return {"left": remaining()}

    return app


async def test_a_service_takes_a_tiny_deadline_as_its_floor() -> None:
    transport = httpx.ASGITransport(app=budget_app(100))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/left", headers={"x-request-timeout-ms": "1"})
    assert 0.05 < response.json()["left"] <= 0.1
