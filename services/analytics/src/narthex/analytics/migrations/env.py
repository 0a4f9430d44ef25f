"""Alembic environment of the analytics service: migrates on the connection that migrate() lends."""

from __future__ import annotations

from narthex.analytics.models import metadata
from narthex.common.database import run_migrations

run_migrations(metadata, "analytics")
