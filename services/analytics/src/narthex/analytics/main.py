"""App factory of the analytics service."""

from __future__ import annotations

from fastapi import FastAPI

from narthex.analytics.settings import AnalyticsSettings
from narthex.common.app import service_app
from narthex.common.authn import remote_verifier


def create_app(settings: AnalyticsSettings | None = None) -> FastAPI:
    settings = settings or AnalyticsSettings()
    return service_app(
        settings,
        title="narthex analytics",
        authenticate=True,
        verifier=remote_verifier,
        description="Usage and prediction aggregates, drift.",
    )
