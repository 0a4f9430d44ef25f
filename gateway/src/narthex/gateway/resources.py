"""What the gateway's lifespan opens and hands each request in `scope["state"]`, typed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, TypedDict

from fastapi import Depends, Request

from narthex.common.events import EventBuffer
from narthex.common.http import ServiceClient
from narthex.gateway.identity import Identity
from narthex.gateway.ratelimit.edge import EdgeLimiter
from narthex.gateway.ratelimit.guard import ClientGuard
from narthex.gateway.ratelimit.plans import Plans
from narthex.gateway.revocations import Revocations
from narthex.gateway.upstreams import UpstreamHealth


class GatewayState(TypedDict):
    clients: Mapping[str, ServiceClient]  # one per upstream, by the route table's names
    identity: Identity
    plans: Plans
    limiter: EdgeLimiter
    usage_events: EventBuffer | None  # None without an events stream
    upstreams: UpstreamHealth
    revocations: Revocations
    guard: ClientGuard  # per-client-IP, on the token exchange and the dashboard login


# `async def`: FastAPI would run a plain `def` dependency in a worker thread.
async def _state(request: Request) -> GatewayState:
    state: GatewayState = request.scope["state"]
    return state


State = Annotated[GatewayState, Depends(_state)]
