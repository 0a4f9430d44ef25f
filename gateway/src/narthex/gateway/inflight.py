"""Requests each tenant has in flight through this gateway: capped, so that no tenant can hold
every pooled connection to an upstream."""

from __future__ import annotations

from narthex.gateway.ratelimit import RateLimited


class TooManyInFlight(RateLimited):
    type_slug, title = "too-many-in-flight", "Too many requests in flight"


class TenantInFlight:
    """A count per tenant, raised on `acquire` and lowered on `release`.

    The connections to each upstream are one pool shared by every tenant, and a rate
    limit bounds requests per second, not how long they last: against a slow upstream a
    tenant within its rate could hold them all, and everyone else would wait for a
    connection. With at most `limit` requests of its own in flight, a tenant can take
    only its share; the rest get a 429 with Retry-After, before anything is charged.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[str, int] = {}

    def acquire(self, tenant: str) -> None:
        count = self._counts.get(tenant, 0)
        if count >= self.limit:
            raise TooManyInFlight(
                f"at most {self.limit} requests of a tenant in flight at once",
                headers={"Retry-After": "1"},
            )
        self._counts[tenant] = count + 1

    def release(self, tenant: str) -> None:
        count = self._counts.get(tenant, 0) - 1
        if count > 0:
            self._counts[tenant] = count
        else:
            self._counts.pop(tenant, None)

    def __getitem__(self, tenant: str) -> int:
        return self._counts.get(tenant, 0)
