"""What the gateway's lifespan puts on `app.state`, typed for the code that reads it."""

from __future__ import annotations

from starlette.types import Scope

from narthex.common.events import EventBuffer
from narthex.gateway.identity import Identity
from narthex.gateway.ratelimit.edge import EdgeLimiter
from narthex.gateway.ratelimit.plans import PlanBook
from narthex.gateway.upstreams import UpstreamHealth


def app_identity(scope: Scope) -> Identity:
    identity: Identity = scope["app"].state.identity
    return identity


def app_limits(scope: Scope) -> tuple[PlanBook, EdgeLimiter]:
    state = scope["app"].state
    plans: PlanBook = state.plans
    limiter: EdgeLimiter = state.limiter
    return plans, limiter


def app_upstreams(scope: Scope) -> UpstreamHealth:
    upstreams: UpstreamHealth = scope["app"].state.upstreams
    return upstreams


def app_usage_events(scope: Scope) -> EventBuffer | None:
    events: EventBuffer | None = scope["app"].state.usage_events
    return events
