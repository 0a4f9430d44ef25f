"""The gateway's own refusals: limits, credentials, bodies and methods it turns away at the edge.

Rendered by narthex.common.errors in the protocol of the route they were refused on.
"""

from __future__ import annotations

from narthex.common.errors import (
    BadRequest,
    Forbidden,
    Problem,
    Unauthorized,
    ValidationFailed,
)

__all__ = [
    "InvalidBody",
    "KeyInQuery",
    "MethodNotAllowed",
    "ModelNotAllowed",
    "QuotaExceeded",
    "RateLimited",
    "TooManyInFlight",
    "TooManyItems",
]


class MethodNotAllowed(Problem):
    status, type_slug, title = 405, "method-not-allowed", "Method not allowed"


class RateLimited(Problem):
    status, type_slug, title = 429, "rate-limited", "Rate limit exceeded"


class QuotaExceeded(Problem):
    status, type_slug, title = 429, "quota-exceeded", "Daily quota exceeded"


class TooManyInFlight(RateLimited):
    type_slug, title = "too-many-in-flight", "Too many requests in flight"


class TooManyItems(ValidationFailed):
    type_slug, title = "too-many-items", "Too many items in one request"


class InvalidBody(BadRequest):
    type_slug, title = "invalid-body", "The request body cannot be read"


class KeyInQuery(Unauthorized):
    type_slug, title = "credentials-in-query", "Credentials are accepted only in headers"

    def __init__(self) -> None:
        # Query strings end up in logs, proxies and browser history: refused, not used.
        super().__init__(
            "send the key as `X-API-Key` or `Authorization: Bearer`",
            headers={"WWW-Authenticate": 'Bearer realm="narthex"'},
        )


class ModelNotAllowed(Forbidden):
    type_slug, title = "model-not-allowed", "Model not allowed by the plan"
