"""Decoding stream entries into records: what a usage or prediction event must hold.

An entry that cannot be decoded is a producer bug, not a transient fault: it is logged,
counted as invalid and acknowledged, so that it does not come back forever.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

import orjson

from narthex.analytics.models import LATENCY_BOUNDS_MS, SCORE_BINS
from narthex.analytics.store import ScoreRecord, UsageRecord
from narthex.common.events import DATA_FIELD

HOUR = 3600
# Bounds that keep every stored value inside its column on every database: an event
# outside them is invalid, never a transaction that fails on each delivery.
MAX_TIME = 253_402_300_800  # 10000-01-01
MAX_COUNT = 2**31 - 1


def entry_documents(fields: dict[bytes, bytes]) -> list[Any] | None:
    """The events of one stream entry (a JSON array of objects, or one object); None if the
    entry is not that at all."""
    raw = fields.get(DATA_FIELD.encode())
    if raw is None:
        return None
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(document, dict):
        return [document]
    return document if isinstance(document, list) else None


def _text(document: dict[str, Any], name: str, limit: int, *, required: bool = False) -> str:
    value = document.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value) or len(value) > limit:
        raise ValueError(name)
    return value


def _number(document: dict[str, Any], name: str) -> float:
    value = document.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(name)
    return float(value)


def _count(document: dict[str, Any], name: str) -> int:
    value = document.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise ValueError(name)
    return value


def _hour(document: dict[str, Any]) -> int:
    seconds = _number(document, "t")
    if not 0 <= seconds < MAX_TIME:
        raise ValueError("t")
    return int(seconds) // HOUR * HOUR


def latency_bucket(ms: float) -> int:
    """Index of the first bucket whose upper bound is at least `ms`."""
    return bisect.bisect_left(LATENCY_BOUNDS_MS, ms)


def usage_record(document: dict[str, Any]) -> UsageRecord:
    """Raises ValueError naming the first field that is missing or wrong."""
    latency = _number(document, "ms")
    status = _count(document, "status")
    if not 100 <= status <= 599:
        raise ValueError("status")
    if not 0 <= latency < 1e12:
        raise ValueError("ms")
    return UsageRecord(
        id=_text(document, "id", 64, required=True),
        hour=_hour(document),
        tenant=_text(document, "tenant", 64, required=True),
        key_id=_text(document, "key", 64),
        route=_text(document, "route", 64),
        model=_text(document, "model", 128),
        version=_text(document, "version", 32),
        status=status,
        items=_count(document, "items"),
        limited=bool(document.get("limited", False)),
        latency_ms=latency,
        latency_bucket=latency_bucket(latency),
    )


def score_record(document: dict[str, Any]) -> ScoreRecord:
    counts = document.get("counts")
    if (
        not isinstance(counts, list)
        or len(counts) != SCORE_BINS
        or not all(type(c) is int and 0 <= c <= MAX_COUNT for c in counts)
    ):
        raise ValueError("counts")
    return ScoreRecord(
        id=_text(document, "id", 64, required=True),
        hour=_hour(document),
        model=_text(document, "model", 128, required=True),
        version=_text(document, "version", 32, required=True),
        tenant=_text(document, "tenant", 64),
        counts=tuple(counts),
    )
