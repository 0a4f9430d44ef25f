"""Initial auth schema (plans, tenants, api_keys, audit_log) and the built-in plans."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from narthex.auth.models import UTCDateTime

revision: str = "0001_initial"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BUILTIN_PLANS = [
    # name, rate/s, burst, daily quota, max items per request
    ("free", 1.0, 5, 1_000, 10),
    ("standard", 20.0, 50, 100_000, 100),
    ("enterprise", 200.0, 500, 10_000_000, 100),
]


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    plans = op.create_table(
        "plans",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("rate_per_second", sa.Double(), nullable=False),
        sa.Column("burst", sa.Integer(), nullable=False),
        sa.Column("daily_quota", sa.Integer(), nullable=False),
        sa.Column("max_items_per_request", sa.Integer(), nullable=False),
        sa.Column("allowed_models", _json(), nullable=False),
        sa.Column("builtin", sa.Boolean(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_plans"),
    )
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(18), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("plan_name", sa.String(64), nullable=False),
        sa.Column("roles", _json(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("disabled_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_tenants"),
        sa.UniqueConstraint("name", name="uq_tenants_name"),
        sa.ForeignKeyConstraint(["plan_name"], ["plans.name"], name="fk_tenants_plan_name_plans"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(16), nullable=False),
        sa.Column("tenant_id", sa.String(18), nullable=False),
        sa.Column("env", sa.String(16), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=True),
        sa.Column("last_used_at", UTCDateTime(), nullable=True),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        sa.Column("replaced_by", sa.String(16), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name="fk_api_keys_tenant_id_tenants"
        ),
        sa.ForeignKeyConstraint(
            ["replaced_by"], ["api_keys.id"], name="fk_api_keys_replaced_by_api_keys"
        ),
    )
    op.create_index("ix_api_keys_tenant_id", "api_keys", ["tenant_id"])
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(200), nullable=False),
        sa.Column("detail", _json(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )

    now = datetime.now(UTC)
    op.bulk_insert(
        plans,
        [
            {
                "name": name,
                "rate_per_second": rate,
                "burst": burst,
                "daily_quota": daily,
                "max_items_per_request": max_items,
                "allowed_models": [],
                "builtin": True,
                "created_at": now,
            }
            for name, rate, burst, daily, max_items in BUILTIN_PLANS
        ],
    )


def downgrade() -> None:
    op.drop_table("audit_log")
    op.drop_index("ix_api_keys_tenant_id", table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("tenants")
    op.drop_table("plans")
