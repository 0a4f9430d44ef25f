"""Per-request context: the request id and the trace ids every log line and error carries."""

from __future__ import annotations

import os
import re
from contextvars import ContextVar

from opentelemetry import trace

REQUEST_ID_HEADER = "x-request-id"

# Incoming ids are echoed into logs and headers, so only a conservative alphabet and
# length is believed; anything else is replaced, never sanitised.
_WELL_FORMED = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{7,127}")

request_id_var: ContextVar[str | None] = ContextVar("narthex_request_id", default=None)


# Random ids come from the OS's CSPRNG 256 at a time: one getrandom syscall per id was
# two of a gateway request's syscalls. A forked child starts on a fresh draw, so no two
# processes ever hand out the same ids.
_IDS_PER_DRAW = 256
_drawn = ""  # hex digits, 32 per id
_next = 0


def _forget_drawn() -> None:
    global _drawn, _next
    _drawn, _next = "", 0


os.register_at_fork(after_in_child=_forget_drawn)


def random_id() -> str:
    """128 random bits (as unique as a uuid4) as 32 lowercase hex digits."""
    global _drawn, _next
    at = _next
    if at >= len(_drawn):
        _drawn, at = os.urandom(16 * _IDS_PER_DRAW).hex(), 0
    _next = at + 32
    return _drawn[at : at + 32]


def new_request_id() -> str:
    return random_id()


def accept_request_id(incoming: str | None) -> str:
    """The caller's id when it is well formed, else a fresh one."""
    if incoming and _WELL_FORMED.fullmatch(incoming):
        return incoming
    return new_request_id()


def current_request_id() -> str | None:
    return request_id_var.get()


def current_trace_id() -> str | None:
    """The active span's trace id as 32 lowercase hex digits, if there is one."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None
