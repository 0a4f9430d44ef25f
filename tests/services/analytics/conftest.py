"""Analytics fixtures: a freshly migrated database on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from narthex.analytics.store import AnalyticsStore, migrate
from tests.support.databases import BACKENDS, migrated_database


@pytest.fixture(params=BACKENDS, ids=BACKENDS)
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    async with migrated_database(request.param, tmp_path, migrate) as url:
        yield url


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[AnalyticsStore]:
    async with await AnalyticsStore.open(database_url) as store:
        yield store
