"""Throwaway databases for tests: a SQLite file, or a fresh PostgreSQL database dropped after."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import asyncpg
from sqlalchemy.engine import make_url

from narthex.testing.backing import POSTGRES
from narthex.testing.missing import service_unavailable

__all__ = [
    "BACKENDS",
    "POSTGRES_ADMIN_URL",
    "Backend",
    "migrated_database",
    "postgres_database",
    "service_unavailable",
    "sqlite_url",
    "throwaway_database",
]

Backend = Literal["sqlite", "postgres"]
BACKENDS: tuple[Backend, ...] = ("sqlite", "postgres")

# A maintenance database on a server that trusts local connections; CREATE DATABASE rights:
# NARTHEX_TEST_POSTGRES_URL, or the default; a private server's when the session started one
# (`backing`).
POSTGRES_ADMIN_URL = POSTGRES.configured(os.environ)
_CONNECT_TIMEOUT_S = 3.0


def sqlite_url(directory: Path, name: str = "test.db") -> str:
    return f"sqlite+aiosqlite:///{directory / name}"


async def _admin_connection() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=_CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        service_unavailable(f"PostgreSQL at {POSTGRES_ADMIN_URL} unreachable: {exc!r}")


@asynccontextmanager
async def postgres_database() -> AsyncIterator[str]:
    """A new empty database; yields its `postgresql+asyncpg://` URL, drops it afterwards."""
    name = "narthex_t_" + secrets.token_hex(6)
    admin = await _admin_connection()
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield (
            make_url(POSTGRES_ADMIN_URL)
            .set(drivername="postgresql+asyncpg", database=name)
            .render_as_string(hide_password=False)
        )
    finally:
        admin = await _admin_connection()
        try:
            # FORCE: a connection the test leaked must not keep the database alive.
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@asynccontextmanager
async def throwaway_database(backend: Backend, tmp_path: Path) -> AsyncIterator[str]:
    """An async SQLAlchemy URL to an empty database of `backend`, gone after the block."""
    if backend == "sqlite":
        yield sqlite_url(tmp_path)
        return
    async with postgres_database() as url:
        yield url


@asynccontextmanager
async def migrated_database(
    backend: Backend, tmp_path: Path, migrate: Callable[[str], Awaitable[None]]
) -> AsyncIterator[str]:
    """`throwaway_database`, with a service's migrations (its `migrate(url)`) applied."""
    async with throwaway_database(backend, tmp_path) as url:
        await migrate(url)
        yield url
