"""Alembic environment of the analytics service: migrates on the connection that migrate() lends."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from narthex.analytics.models import metadata

# No alembic.ini and no URL here: narthex.analytics.store.migrate() opens the async engine
# (with the same SQLite pragmas as the service) and hands over a sync-facade connection.
connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError(
        "run the analytics migrations through narthex.analytics.store.migrate(database_url)"
    )

context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite cannot ALTER most things: later migrations rebuild tables in batch mode there.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
