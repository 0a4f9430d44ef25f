"""Alembic environment of the auth service: migrates on the connection that migrate() lends."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from narthex.auth.models import Base

# No alembic.ini and no URL here: narthex.auth.database.migrate() opens the async engine
# (with the same SQLite pragmas as the service) and hands over a sync-facade connection.
connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError(
        "run the auth migrations through narthex.auth.database.migrate(database_url)"
    )

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things: later migrations rebuild tables in batch mode there.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
