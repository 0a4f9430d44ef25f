"""A service's SQL database: the async engine (PostgreSQL, or SQLite with the pragmas it
needs), Alembic migrations run once across replicas, and the open/ping/close every store has.

Needs the `database` extra (`narthex-common[database]`): only services with a database
import this module."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Self

from alembic import command, context
from alembic.config import Config
from sqlalchemy import Connection, MetaData, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

__all__ = ["Database", "create_engine", "migrate", "run_migrations"]

# A writer waits this long for another replica's write lock on a SQLite file.
SQLITE_BUSY_MS = 30_000


def create_engine(database_url: str, *, immediate: bool = False) -> AsyncEngine:
    """An engine on an async URL: `sqlite+aiosqlite:///path` or `postgresql+asyncpg://...`.

    `immediate` (SQLite): every transaction takes the write lock up front, so that two
    replicas' read-then-write transactions queue instead of both reading, then failing to
    upgrade to a writer. Stores whose transactions only write, or only read, leave it off."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        # pre-ping: a restarted or failed-over server costs one retry, not an error.
        return create_async_engine(url, pool_pre_ping=True)
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url)
    begin = "BEGIN IMMEDIATE" if immediate else "BEGIN"

    def on_begin(connection: Connection) -> None:
        connection.exec_driver_sql(begin)

    event.listen(engine.sync_engine, "connect", _sqlite_connect)
    event.listen(engine.sync_engine, "begin", on_begin)
    return engine


def _sqlite_connect(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    # Take BEGIN away from the sqlite3 driver (see create_engine): its legacy mode runs
    # SELECTs outside the transaction and DDL in autocommit.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys = ON")  # off by default, and per connection
    cursor.execute("PRAGMA journal_mode = WAL")  # readers do not block the writer
    cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_MS}")
    cursor.close()


async def migrate(database_url: str, migrations: Path, *, lock_key: int) -> None:
    """`alembic upgrade head` from `migrations` on an async URL; a no-op when the schema is
    current. `lock_key`: any constant of the service's own, the same in every replica."""
    engine = create_engine(database_url)
    try:
        async with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                # Replicas starting together: one migrates, the others wait, then find head.
                await connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key}
                )
            await connection.run_sync(_upgrade, migrations)
    finally:
        await engine.dispose()


def _upgrade(connection: Connection, migrations: Path) -> None:
    config = Config()
    # configparser interpolation: a literal % in the install path must be doubled.
    config.set_main_option("script_location", str(migrations).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    # migrations/env.py runs on this connection, inside migrate()'s transaction.
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def run_migrations(metadata: MetaData, service: str) -> None:
    """What a service's `migrations/env.py` does: run its migrations on the connection that
    `migrate` lends. No alembic.ini and no URL: `migrate` opens the async engine (with the
    same SQLite pragmas as the service) and hands over a sync-facade connection."""
    connection = context.config.attributes.get("connection")
    if not isinstance(connection, Connection):
        raise RuntimeError(
            f"run the {service} migrations through its migrate(database_url), not alembic's CLI"
        )
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite cannot ALTER most things: later migrations rebuild tables in batch mode there.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


class Database:
    """What every store on an engine has: opening (connected once, so that a wrong URL or a
    down server fails start-up, not a request), readiness and closing."""

    # Subclasses whose transactions read then write set this (see create_engine).
    immediate = False

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    @classmethod
    async def open(cls, database_url: str) -> Self:
        store = cls(create_engine(database_url, immediate=cls.immediate))
        try:
            await store.ping()
        except BaseException:
            await store.close()
            raise
        return store

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    async def ping(self) -> None:
        """Round trip to the database (readiness); raises when it cannot be reached."""
        async with self._engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    async def close(self) -> None:
        await self._engine.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
