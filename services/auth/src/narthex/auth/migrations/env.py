"""Alembic environment of the auth service: migrates on the connection that migrate() lends."""

from __future__ import annotations

from narthex.auth.models import Base
from narthex.common.database import run_migrations

run_migrations(Base.metadata, "auth")
