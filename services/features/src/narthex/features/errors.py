"""The feature service's errors: the online store away (every other refusal is a 422)."""

from __future__ import annotations

from narthex.common.errors import ServiceUnavailable

__all__ = ["StoreUnavailable"]


class StoreUnavailable(ServiceUnavailable):
    type_slug, title = "store-unavailable", "Feature store temporarily unavailable"

    def __init__(self) -> None:
        super().__init__(
            "the online store did not answer; try again (ingestion is idempotent)",
            headers={"Retry-After": "1"},
        )
