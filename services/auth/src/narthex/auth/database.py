"""The auth database's migrations and migrate() (the engine is `narthex.common.database`'s)."""

from __future__ import annotations

from pathlib import Path

from narthex.common import database

__all__ = ["MIGRATIONS", "migrate"]

MIGRATIONS = Path(__file__).with_name("migrations")
# Any constant will do: it only has to be the same for every replica running migrate().
_MIGRATION_LOCK = 0x6E61727468657801


async def migrate(database_url: str) -> None:
    """`alembic upgrade head` on an async URL; a no-op when the schema is current."""
    await database.migrate(database_url, MIGRATIONS, lock_key=_MIGRATION_LOCK)
