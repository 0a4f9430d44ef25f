"""Answers to public routes that are the same for every caller (the JWKS), kept briefly."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from narthex.common.errors import Problem
from narthex.common.transport import Exchange
from narthex.gateway.singleflight import SingleFlight


class PublicAnswers:
    """The last good answer of each cached route, fetched at most once per `ttl` seconds.

    Anyone may call these routes, as often as they like: they are answered from here,
    so the upstream sees one call per period whatever the traffic, and a client's
    headers, query or deadline never shape an answer others get. When the upstream
    fails, the last good answer is served stale rather than not at all.
    """

    def __init__(self, ttl: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._answers: dict[str, tuple[Exchange, float]] = {}
        self._flights: SingleFlight[Exchange] = SingleFlight()
        self.fetches = 0

    async def get(self, name: str, fetch: Callable[[], Awaitable[Exchange]]) -> Exchange:
        held = self._answers.get(name)
        if held is not None and held[1] > self._clock():
            return held[0]

        async def refresh() -> Exchange:
            self.fetches += 1
            answer = await fetch()
            if answer.status_code == 200:
                self._answers[name] = (answer, self._clock() + self.ttl)
            return answer

        try:
            answer = await self._flights.run(name, refresh)
        except Problem:
            if held is None:
                raise
            return held[0]
        if answer.status_code >= 500 and held is not None:
            return held[0]
        return answer
