"""What the load test expects of an answer: a 200's body checked, a refusal worded as
Locust groups failures, a 429's Retry-After read. No Locust here (importing it patches the
process for gevent), so that it is tested on its own."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["BadAnswer", "Check", "counted", "has", "listing", "refusal", "retry_after"]


def retry_after(headers: Mapping[str, str], ceiling: float) -> float:
    """Seconds a 429 asks the caller to wait (1 when it does not say), at most `ceiling`."""
    try:
        seconds = float(headers.get("retry-after", "1"))
    except (TypeError, ValueError):
        seconds = 1.0
    return min(max(seconds, 0.0), ceiling)


class BadAnswer(Exception):
    """What the SDK's call got instead of the embeddings, as the request's failure."""


def refusal(status: int, text: str) -> str:
    """A failure as Locust groups them: status and problem title, never the request's id
    (one line per request otherwise)."""
    try:
        problem = json.loads(text)
    except ValueError:
        problem = None
    if isinstance(problem, dict) and "title" in problem:
        return f"{status} {problem['title']} ({problem.get('type', '')})"
    return f"{status}: {text[:100]}"


# What a 200's JSON body must be: None when it is, else what is wrong with it.
Check = Callable[[Any], str | None]


def listing(field: str, count: int | None = None) -> Check:
    """A list at `field`: `count` items long, or at least one."""

    def check(body: Any) -> str | None:
        items = body.get(field) if isinstance(body, dict) else None
        if not isinstance(items, list):
            return f"no list {field!r}"
        if count is None and not items:
            return f"an empty {field!r}"
        if count is not None and len(items) != count:
            return f"{len(items)} {field} for {count} items"
        return None

    return check


def has(field: str) -> Check:
    def check(body: Any) -> str | None:
        return None if isinstance(body, dict) and field in body else f"no {field!r}"

    return check


def counted(events: int) -> Check:
    """Every posted event answered for: accepted, a duplicate, or too old to count."""

    def check(body: Any) -> str | None:
        fields = ("accepted", "duplicates", "stale")
        total = sum(int(body.get(f, 0)) for f in fields) if isinstance(body, dict) else -1
        return None if total == events else f"{total} of {events} events answered for"

    return check
