"""App factory of the inference service."""

from __future__ import annotations

from fastapi import FastAPI

from narthex.common.app import service_app
from narthex.common.authn import remote_verifier
from narthex.inference.settings import InferenceSettings


def create_app(settings: InferenceSettings | None = None) -> FastAPI:
    settings = settings or InferenceSettings()
    return service_app(
        settings,
        title="narthex inference",
        authenticate=True,
        verifier=remote_verifier,
        description="Model repository, dynamic batching and ONNX Runtime serving.",
    )
