"""App factory of the features service."""

from __future__ import annotations

from fastapi import FastAPI

from narthex.common.app import service_app
from narthex.common.authn import remote_verifier
from narthex.features.settings import FeaturesSettings


def create_app(settings: FeaturesSettings | None = None) -> FastAPI:
    settings = settings or FeaturesSettings()
    return service_app(
        settings,
        title="narthex features",
        authenticate=True,
        verifier=remote_verifier,
        description="Online feature store and transaction event ingestion.",
    )
