"""Request deadlines: one absolute budget per request, carried across every hop."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

# Remaining budget in milliseconds, sent on every internal call so the callee can drop
# work its caller will no longer wait for.
DEADLINE_HEADER = "x-request-timeout-ms"

_deadline_var: ContextVar[float] = ContextVar("narthex_deadline", default=math.inf)


def deadline_at() -> float:
    """Absolute `time.monotonic()` deadline of the current request (inf when unbounded)."""
    return _deadline_var.get()


def remaining() -> float:
    return deadline_at() - time.monotonic()


@contextmanager
def deadline(seconds: float) -> Iterator[float]:
    """Bound everything inside to `seconds`, or less when an outer deadline is sooner."""
    at = min(_deadline_var.get(), time.monotonic() + seconds)
    token = _deadline_var.set(at)
    try:
        yield at
    finally:
        _deadline_var.reset(token)


def parse_header(value: str | None) -> float | None:
    """Seconds from a `x-request-timeout-ms` value; None when absent or malformed."""
    if not value or not value.isdigit() or len(value) > 9:
        return None
    return int(value) / 1000.0
