"""The analytics tables: processed event ids, hourly usage rows, hourly score counts.

Every counter is a plain integer column so that an aggregate update is `col = col + n`
(mergeable, order-free) and a day or any range is a SUM over its hours. The latency
histogram is one column per bucket for the same reason.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, Integer, MetaData, String, Table

metadata = MetaData()

# Upper bounds, milliseconds; the last bucket is everything above the one before it.
LATENCY_BOUNDS_MS: tuple[float, ...] = (
    1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, float("inf"),
)  # fmt: skip
LATENCY_COLUMNS: tuple[str, ...] = tuple(f"lat_{i:02d}" for i in range(len(LATENCY_BOUNDS_MS)))
# Score histograms: equal bins over [0, 1], the layout of every model's `score_baseline`.
SCORE_BINS = 10
SCORE_COLUMNS: tuple[str, ...] = tuple(f"bin_{i:02d}" for i in range(SCORE_BINS))

USAGE_KEYS = ("tenant", "hour", "key_id", "route", "model", "version", "status")
SCORE_KEYS = ("model", "version", "tenant", "hour")

processed_events = Table(
    "processed_events",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("applied_at", BigInteger, nullable=False, index=True),
)

usage_hourly = Table(
    "usage_hourly",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("hour", BigInteger, primary_key=True),  # UTC epoch seconds of the hour's start
    Column("key_id", String(64), primary_key=True),  # "" when the token named no key
    Column("route", String(64), primary_key=True),
    Column("model", String(128), primary_key=True),
    Column("version", String(32), primary_key=True),
    Column("status", Integer, primary_key=True),
    Column("requests", BigInteger, nullable=False),
    Column("items", BigInteger, nullable=False),
    Column("limited", BigInteger, nullable=False),
    Column("latency_ms_sum", Float, nullable=False),
    *(Column(name, BigInteger, nullable=False) for name in LATENCY_COLUMNS),
)

score_hourly = Table(
    "score_hourly",
    metadata,
    Column("model", String(128), primary_key=True),
    Column("version", String(32), primary_key=True),
    Column("tenant", String(64), primary_key=True),
    Column("hour", BigInteger, primary_key=True),
    Column("predictions", BigInteger, nullable=False),
    *(Column(name, BigInteger, nullable=False) for name in SCORE_COLUMNS),
)
