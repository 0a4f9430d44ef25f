"""The auth database's engine (PostgreSQL, or SQLite with the pragmas it needs) and migrate()."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

__all__ = ["MIGRATIONS", "create_engine", "migrate"]

MIGRATIONS = Path(__file__).with_name("migrations")
# Any constant will do: it only has to be the same for every replica running migrate().
_MIGRATION_LOCK = 0x6E61727468657801


async def migrate(database_url: str) -> None:
    """`alembic upgrade head` on an async URL; a no-op when the schema is current."""
    engine = create_engine(database_url)
    try:
        async with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                # Replicas starting together: one migrates, the others wait, then find head.
                await connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK}
                )
            await connection.run_sync(_upgrade)
    finally:
        await engine.dispose()


def _upgrade(connection: Connection) -> None:
    config = Config()
    # configparser interpolation: a literal % in the install path must be doubled.
    config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    # migrations/env.py runs on this connection, inside migrate()'s transaction.
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def create_engine(database_url: str) -> AsyncEngine:
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        # pre-ping: a restarted or failed-over server costs one retry, not an error.
        return create_async_engine(url, pool_pre_ping=True)
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url)
    event.listen(engine.sync_engine, "connect", _sqlite_connect)
    event.listen(engine.sync_engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connect(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    # Take BEGIN away from the sqlite3 driver (see _sqlite_begin): its legacy mode runs SELECTs
    # outside the transaction and DDL in autocommit.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys = ON")  # off by default, and per connection
    cursor.execute("PRAGMA journal_mode = WAL")  # readers do not block the writer
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    connection.exec_driver_sql("BEGIN")
