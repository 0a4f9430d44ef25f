"""Auth's errors: refused credentials and scopes, and the store's refusals, each a Problem."""

from __future__ import annotations

from narthex.common.errors import BadRequest, Conflict, InvalidCredentials, NotFound

__all__ = [
    "AlreadyBootstrapped",
    "Conflict",
    "InvalidCredentials",
    "InvalidScope",
    "UnknownKey",
    "UnknownPlan",
    "UnknownTenant",
]


class InvalidScope(BadRequest):
    type_slug, title = "invalid-scope", "Requested scope not allowed"


class AlreadyBootstrapped(Conflict):
    title = "Already bootstrapped"


class UnknownPlan(NotFound):
    """`name` is no plan's: the caller names plans, so the service may turn this into a 422."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no plan named {name!r}")
        self.name = name


class UnknownTenant(NotFound):
    def __init__(self, tenant_id: str) -> None:
        super().__init__(f"no tenant {tenant_id!r}")


class UnknownKey(NotFound):
    def __init__(self, key_id: str) -> None:
        super().__init__(f"no key {key_id!r}")
