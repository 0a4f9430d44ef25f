"""The analytics app in process: its lifespan's state reaches the routes; no loop runs."""

from __future__ import annotations

from pathlib import Path

import httpx

from narthex.analytics.main import create_app
from narthex.analytics.routes import AnalyticsState
from narthex.analytics.settings import AnalyticsSettings
from narthex.common import scopes
from narthex.testing.lifespan import started
from tests.support.tokens import bearer, static_verifier


async def test_usage_is_answered_from_the_lifespans_service(tmp_path: Path) -> None:
    settings = AnalyticsSettings(
        database_url=f"sqlite+aiosqlite:///{tmp_path}/analytics.db",
        redis_url=None,
        model_repository=tmp_path / "models",
        tracing=False,
    )
    app = create_app(settings, verifier=static_verifier, background=False)
    async with (
        started(app, AnalyticsState) as running,
        httpx.AsyncClient(transport=httpx.ASGITransport(running.app), base_url="http://a") as c,
    ):
        usage = await c.get("/v1/usage", headers=bearer([scopes.TENANT], [scopes.USAGE]))
        anonymous = await c.get("/v1/usage")
        ready = await c.get("/readyz")

    assert usage.status_code == 200, usage.text
    assert anonymous.status_code == 401
    assert ready.json()["checks"]["database"]["status"] == "up"
    assert running.state["consumers"] == []  # no Redis: nothing to consume
