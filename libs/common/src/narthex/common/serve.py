"""Process entry point shared by every service: settings, logging, uvicorn."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

import uvicorn
from fastapi import FastAPI

from narthex.common.logging import configure_logging
from narthex.common.settings import ServiceSettings, SettingsError, load_settings

S = TypeVar("S", bound=ServiceSettings)


def serve(settings_cls: type[S], create_app: Callable[[S], FastAPI]) -> None:
    """Load settings (exit 2 with one line naming the bad setting), then serve."""
    try:
        settings = load_settings(settings_cls)
    except SettingsError as exc:
        print(exc.message, file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.service_name, level=settings.log_level, json=settings.log_json)
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,  # RequestContextMiddleware writes the access log
        log_config=None,  # keep the JSON logging configured above
        server_header=False,
        timeout_graceful_shutdown=10,
    )
