"""Initial analytics schema: processed event ids, hourly usage, hourly score counts."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_initial"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the layout at this revision (models.py may grow later).
LATENCY_BUCKETS = 14
SCORE_BINS = 10


def upgrade() -> None:
    op.create_table(
        "processed_events",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("applied_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_processed_events_applied_at", "processed_events", ["applied_at"])
    op.create_table(
        "usage_hourly",
        sa.Column("tenant", sa.String(64), primary_key=True),
        sa.Column("hour", sa.BigInteger, primary_key=True),
        sa.Column("key_id", sa.String(64), primary_key=True),
        sa.Column("route", sa.String(64), primary_key=True),
        sa.Column("model", sa.String(128), primary_key=True),
        sa.Column("version", sa.String(32), primary_key=True),
        sa.Column("status", sa.Integer, primary_key=True),
        sa.Column("requests", sa.BigInteger, nullable=False),
        sa.Column("items", sa.BigInteger, nullable=False),
        sa.Column("limited", sa.BigInteger, nullable=False),
        sa.Column("latency_ms_sum", sa.Float, nullable=False),
        *(sa.Column(f"lat_{i:02d}", sa.BigInteger, nullable=False) for i in range(LATENCY_BUCKETS)),
    )
    op.create_table(
        "score_hourly",
        sa.Column("model", sa.String(128), primary_key=True),
        sa.Column("version", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(64), primary_key=True),
        sa.Column("hour", sa.BigInteger, primary_key=True),
        sa.Column("predictions", sa.BigInteger, nullable=False),
        *(sa.Column(f"bin_{i:02d}", sa.BigInteger, nullable=False) for i in range(SCORE_BINS)),
    )


def downgrade() -> None:
    op.drop_table("score_hourly")
    op.drop_table("usage_hourly")
    op.drop_index("ix_processed_events_applied_at", "processed_events")
    op.drop_table("processed_events")
