"""Auth fixtures: a freshly migrated database on SQLite and on PostgreSQL; the app in process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from narthex.auth.database import migrate
from narthex.auth.main import create_app
from narthex.auth.routes import AuthState
from narthex.auth.service import AuthService
from narthex.auth.settings import AuthSettings
from narthex.auth.store import AuthStore
from narthex.testing.lifespan import started
from tests.support.databases import BACKENDS, migrated_database


@pytest.fixture(params=BACKENDS, ids=BACKENDS)
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    async with migrated_database(request.param, tmp_path, migrate) as url:
        yield url


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[AuthStore]:
    async with await AuthStore.open(database_url) as store:
        yield store


@pytest.fixture
async def auth(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, AuthService]]:
    """The auth app (SQLite) through its lifespan: a client to it, and its service."""
    settings = AuthSettings(
        env="dev",
        database_url=f"sqlite+aiosqlite:///{tmp_path}/auth.db",
        signing_keys_dir=tmp_path / "keys",
        tracing=False,
    )
    app = create_app(settings)
    async with started(app, AuthState) as running:
        transport = httpx.ASGITransport(app=running.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://auth") as client:
            yield client, running.state["auth"]
