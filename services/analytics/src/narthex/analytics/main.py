"""App factory of the analytics service."""

from __future__ import annotations

from fastapi import FastAPI

from narthex.analytics.settings import AnalyticsSettings
from narthex.common.app import service_app


def create_app(settings: AnalyticsSettings | None = None) -> FastAPI:
    settings = settings or AnalyticsSettings()
    return service_app(
        settings,
        title="narthex analytics",
        description="Usage and prediction aggregates, drift.",
    )
