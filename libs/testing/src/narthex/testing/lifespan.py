"""An app's lifespan run in process, its state handed to each request as a server hands it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

S = TypeVar("S", bound=Mapping[str, Any])


@dataclass(frozen=True, slots=True)
class Started(Generic[S]):
    """`app` gives each request a shallow copy of `state` in `scope["state"]`, as uvicorn
    does; `state` is what the lifespan yielded, typed as the service declares it."""

    app: ASGIApp
    state: S


@asynccontextmanager
async def started(app: Starlette, kind: type[S]) -> AsyncIterator[Started[S]]:
    """Starts `app`'s lifespan, whose state is a `kind` (the service's TypedDict), and
    stops it on exit. Call the app through `Started.app`: an `httpx.ASGITransport` runs
    no lifespan and passes no state."""
    async with app.router.lifespan_context(app) as yielded:
        state: Mapping[str, Any] = yielded or {}

        async def with_state(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] in ("http", "websocket"):
                scope["state"] = dict(state)
            await app(scope, receive, send)

        yield Started(with_state, cast(S, state))
