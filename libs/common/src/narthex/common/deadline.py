"""Request deadlines: one absolute budget per request, carried across every hop."""

from __future__ import annotations

import contextvars
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

# Remaining budget in milliseconds, sent on every internal call so the callee can drop
# work its caller will no longer wait for.
DEADLINE_HEADER = "x-request-timeout-ms"
# What a caller may ask for at the least: a deadline of 1 ms would only turn every call
# it makes into a timeout. Services take their own floor from settings.
DEFAULT_FLOOR_MS = 100

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


def unbounded_context() -> contextvars.Context:
    """A copy of the current context without the request's deadline.

    For work started on behalf of one request but shared with others (a single-flight
    fetch, a cache refresh): its result serves callers whose budgets differ, so the
    first caller's deadline must not cut it short for all of them.
    """
    context = contextvars.copy_context()
    context.run(_deadline_var.set, math.inf)
    return context


def parse_header(value: str | None, floor_ms: int = DEFAULT_FLOOR_MS) -> float | None:
    """Seconds from a `x-request-timeout-ms` value, at least `floor_ms`; None when absent
    or malformed."""
    if not value or not value.isdigit() or len(value) > 9:
        return None
    return max(int(value), floor_ms) / 1000.0
