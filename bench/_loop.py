"""Event-loop choice shared by every bench server, so all of them run on the same loop."""

from __future__ import annotations

import asyncio
import importlib.util

HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None


def new_event_loop() -> asyncio.AbstractEventLoop:
    """Return a uvloop loop when uvloop is importable, else the stdlib default."""
    if HAS_UVLOOP:
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def uvicorn_loop() -> str:
    """The matching uvicorn ``loop=`` setting."""
    return "uvloop" if HAS_UVLOOP else "asyncio"
