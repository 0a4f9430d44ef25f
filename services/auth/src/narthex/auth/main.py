"""App factory of the auth service."""

from __future__ import annotations

from fastapi import FastAPI

from narthex.auth.settings import AuthSettings
from narthex.common.app import service_app


def create_app(settings: AuthSettings | None = None) -> FastAPI:
    settings = settings or AuthSettings()
    return service_app(
        settings,
        title="narthex auth",
        description="Tenants, plans, API keys, JWT issuing and JWKS.",
    )
