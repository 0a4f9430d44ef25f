"""The analytics service's problems (RFC 9457, rendered by narthex.common.errors)."""

from __future__ import annotations

from narthex.common.errors import BadRequest


class BadRange(BadRequest):
    type_slug, title = "bad-range", "Bad time range"
