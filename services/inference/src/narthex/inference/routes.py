"""HTTP routes: Open Inference Protocol v2, v1 predict, OpenAI embeddings, model admin."""

from __future__ import annotations

import asyncio
import base64
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request, Response

from narthex.common import scopes
from narthex.common.authn import CurrentPrincipal, require_admin, require_scope
from narthex.common.codings import decode_content
from narthex.inference import oip
from narthex.inference.errors import InvalidInput, LoadFailed, ModelNotFound, Unavailable
from narthex.inference.models import DEGRADED, LoadedVersion, ModelRegistry
from narthex.inference.repository import RepositoryError, TensorSpec
from narthex.inference.schemas import (
    DefaultRequest,
    EmbeddingsRequest,
    EmbeddingsResponse,
    LoadRequest,
    ModelInfo,
    ModelList,
    PredictRequest,
    PredictResponse,
    UnloadResponse,
    VersionInfo,
)
from narthex.inference.service import InferenceService, Tensor
from narthex.inference.settings import InferenceSettings

SERVER_NAME = "narthex"
SERVER_VERSION = "0.1.0"
PUBLIC_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})


async def _registry(request: Request) -> ModelRegistry:
    registry: ModelRegistry = request.app.state.registry
    return registry


async def _service(request: Request) -> InferenceService:
    service: InferenceService = request.app.state.service
    return service


async def _settings(request: Request) -> InferenceSettings:
    settings: InferenceSettings = request.app.state.settings
    return settings


Registry = Annotated[ModelRegistry, Depends(_registry)]
Service = Annotated[InferenceService, Depends(_service)]
Settings = Annotated[InferenceSettings, Depends(_settings)]

inference = [require_scope(scopes.INFERENCE)]
router = APIRouter()


def _version(text: str | None) -> int | None:
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 9 or int(text) < 1:
        raise ModelNotFound(f"version {text[:20]!r} is not a version number")
    return int(text)


# -- Open Inference Protocol v2 ---------------------------------------------------------------


@router.get("/v2", tags=["oip"], dependencies=inference, summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": ["binary_tensor_data"]}


@router.get("/v2/health/live", tags=["oip"], summary="The server answers")
async def server_live() -> Response:
    return Response(status_code=200)


@router.get("/v2/health/ready", tags=["oip"], summary="Every default model version is warm")
async def server_ready(registry: Registry) -> Response:
    return Response(status_code=200 if registry.ready() else 503)


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": [-1, *spec.dims]}


def _model_metadata(registry: ModelRegistry, name: str, version: str | None) -> dict[str, Any]:
    loaded = registry.resolve(name, _version(version))
    config = loaded.config
    return {
        "name": name,
        "versions": [str(v.version) for v in registry.versions(name)],
        "platform": config.platform,
        "inputs": [_tensor_metadata(t) for t in config.inputs],
        "outputs": [_tensor_metadata(t) for t in config.outputs],
        "parameters": {"version": str(loaded.version), "provider": loaded.provider},
    }


@router.get("/v2/models/{name}", tags=["oip"], dependencies=inference)
async def model_metadata(name: str, registry: Registry) -> dict[str, Any]:
    return _model_metadata(registry, name, None)


@router.get("/v2/models/{name}/versions/{version}", tags=["oip"], dependencies=inference)
async def model_version_metadata(name: str, version: str, registry: Registry) -> dict[str, Any]:
    return _model_metadata(registry, name, version)


def _ready(registry: ModelRegistry, name: str, version: str | None) -> Response:
    try:
        registry.resolve(name, _version(version))
    except Unavailable:  # known, with no version ready
        return Response(status_code=503)
    return Response(status_code=200)


@router.get("/v2/models/{name}/ready", tags=["oip"], dependencies=inference)
async def model_ready(name: str, registry: Registry) -> Response:
    return _ready(registry, name, None)


@router.get("/v2/models/{name}/versions/{version}/ready", tags=["oip"], dependencies=inference)
async def model_version_ready(name: str, version: str, registry: Registry) -> Response:
    return _ready(registry, name, version)


@router.get("/v2/models/{name}/config", tags=["oip"], dependencies=inference)
async def model_config(name: str, registry: Registry) -> dict[str, Any]:
    config = registry.config(name)
    return {
        "name": config.name,
        "platform": config.platform,
        "max_batch_size": config.max_batch_size,
        "input": [
            {"name": t.name, "data_type": f"TYPE_{t.datatype}", "dims": t.dims}
            for t in config.inputs
        ],
        "output": [
            {"name": t.name, "data_type": f"TYPE_{t.datatype}", "dims": t.dims}
            for t in config.outputs
        ],
        "dynamic_batching": {
            "max_queue_delay_microseconds": int(config.dynamic_batching.max_queue_delay_ms * 1000),
            "preferred_batch_size": config.dynamic_batching.preferred_batch_sizes,
        },
    }


async def _infer(
    request: Request,
    service: Service,
    settings: Settings,
    caller: CurrentPrincipal,
    name: str,
    version: str | None,
) -> Response:
    body = await request.body()
    codings = request.headers.getlist("content-encoding")
    if codings:
        # The gateway forwards bodies decoded; a direct caller's are decoded here, under the
        # same caps, off the event loop (16 MiB of output is tens of milliseconds).
        body = await asyncio.to_thread(decode_content, body, codings, limit=settings.max_body_bytes)
    decoded = oip.decode_request(
        body,
        oip.parse_header_length(request.headers.get(oip.HEADER_LENGTH)),
        max_elements=settings.max_body_bytes,
    )
    registry = service.registry
    oip.check_outputs(decoded, [o.name for o in registry.resolve(name, _version(version)).outputs])
    tensors = [Tensor(t.name, t.datatype, t.shape, t.data) for t in decoded.inputs]
    loaded, results = await service.infer(name, _version(version), tensors, tenant=caller.tenant)
    body, header_length = oip.encode_response(
        model_name=name,
        model_version=str(loaded.version),
        request_id=decoded.id,
        outputs=oip.select_outputs(decoded, results),
    )
    version_header = {MODEL_VERSION_HEADER: str(loaded.version)}
    if header_length is None:
        return Response(body, media_type=oip.JSON_CONTENT_TYPE, headers=version_header)
    return Response(
        body,
        media_type=oip.BINARY_CONTENT_TYPE,
        headers={oip.HEADER_LENGTH: str(header_length), **version_header},
    )


@router.post("/v2/models/{name}/infer", tags=["oip"], dependencies=inference)
async def infer(
    name: str, request: Request, service: Service, settings: Settings, caller: CurrentPrincipal
) -> Response:
    return await _infer(request, service, settings, caller, name, None)


@router.post("/v2/models/{name}/versions/{version}/infer", tags=["oip"], dependencies=inference)
async def infer_version(
    name: str,
    version: str,
    request: Request,
    service: Service,
    settings: Settings,
    caller: CurrentPrincipal,
) -> Response:
    return await _infer(request, service, settings, caller, name, version)


# -- v1: predict, models --------------------------------------------------------------------


def _predictions(loaded: LoadedVersion, outputs: dict[str, Any]) -> list[dict[str, Any]]:
    names = [o.name for o in loaded.outputs]
    if DEGRADED in outputs:  # scored on looked-up aggregates: were they the defaults?
        names.append(DEGRADED)
    columns = [outputs[n].tolist() for n in names]
    return [dict(zip(names, row, strict=True)) for row in zip(*columns, strict=True)]


# The version that answered, for the gateway's usage events (the body names it too).
MODEL_VERSION_HEADER = "x-model-version"


def _json(content: Any, version: object = None) -> Response:
    """A JSON response written by orjson straight from numpy arrays. The hot routes skip
    FastAPI's response validation this way: 384 floats per embedding through pydantic cost
    more than the model's own time per text. Their `response_model` still documents them."""
    return Response(
        orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY),
        media_type="application/json",
        headers=None if version is None else {MODEL_VERSION_HEADER: str(version)},
    )


async def _predict(
    service: InferenceService,
    name: str,
    version: str | None,
    body: PredictRequest,
    caller: CurrentPrincipal,
) -> Response:
    loaded, outputs = await service.predict_rows(
        name, _version(version), body.instances, tenant=caller.tenant
    )
    return _json(
        {
            "model": name,
            "version": str(loaded.version),
            "predictions": _predictions(loaded, outputs),
        },
        loaded.version,
    )


@router.post(
    "/v1/models/{name}/predict",
    tags=["v1"],
    dependencies=inference,
    response_model=PredictResponse,
)
async def predict(
    name: str, body: PredictRequest, service: Service, caller: CurrentPrincipal
) -> Response:
    """Predictions for JSON instances from the default version."""
    return await _predict(service, name, None, body, caller)


@router.post(
    "/v1/models/{name}/versions/{version}/predict",
    tags=["v1"],
    dependencies=inference,
    response_model=PredictResponse,
)
async def predict_version(
    name: str,
    version: str,
    body: PredictRequest,
    service: Service,
    caller: CurrentPrincipal,
) -> Response:
    """Predictions from a pinned version."""
    return await _predict(service, name, version, body, caller)


def _model_info(registry: ModelRegistry, name: str) -> ModelInfo:
    default = registry.default_version(name)
    versions = registry.versions(name)
    return ModelInfo(
        id=name,
        created=int(min((v.metadata.created_at.timestamp() for v in versions), default=0)),
        default_version=None if default is None else str(default),
        versions=[
            VersionInfo(
                version=str(v.version),
                state="READY" if v.ready else "LOADING",
                provider=v.provider,
                default=v.version == default,
                sha256=v.metadata.sha256,
                created_at=v.metadata.created_at.isoformat(),
                training_metrics=v.metadata.training_metrics,
            )
            for v in versions
        ],
    )


@router.get("/v1/models", tags=["v1"], dependencies=inference)
async def list_models(registry: Registry) -> ModelList:
    """Loaded models and versions (OpenAI's list shape, with narthex's fields)."""
    return ModelList(data=[_model_info(registry, n) for n in registry.names()])


@router.get("/v1/models/{name}", tags=["v1"], dependencies=inference)
async def get_model(name: str, registry: Registry) -> ModelInfo:
    registry.config(name)  # 404 for an unknown model
    return _model_info(registry, name)


# -- OpenAI-compatible embeddings -------------------------------------------------------------


@router.post(
    "/v1/embeddings", tags=["openai"], dependencies=inference, response_model=EmbeddingsResponse
)
async def embeddings(
    body: EmbeddingsRequest, service: Service, caller: CurrentPrincipal
) -> Response:
    """OpenAI's embeddings API: `openai.OpenAI(base_url=.../v1).embeddings.create(...)`."""
    name, _, pinned = body.model.partition(":")
    texts = [body.input] if isinstance(body.input, str) else body.input
    result = await service.embed(name, _version(pinned or None), texts, tenant=caller.tenant)
    dimension = result.vectors.shape[1]
    if body.dimensions is not None and body.dimensions != dimension:
        raise InvalidInput(
            f"{name} embeddings have {dimension} dimensions; it cannot give {body.dimensions}",
            extra={"param": "dimensions"},
        )
    vectors = np.ascontiguousarray(result.vectors, dtype="<f4")
    encode: Any = (
        (lambda row: base64.b64encode(row.tobytes()).decode())
        if body.encoding_format == "base64"
        else (lambda row: row)
    )
    tokens = sum(result.tokens)
    return _json(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": encode(vectors[i])}
                for i in range(len(texts))
            ],
            "model": f"{name}:{result.model.version}",
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        },
        result.model.version,
    )


# -- admin ----------------------------------------------------------------------------------

admin = [require_admin()]


@router.post("/v1/admin/models/{name}/versions/{version}/load", tags=["admin"], dependencies=admin)
async def load_version(
    name: str, version: int, registry: Registry, body: LoadRequest | None = None
) -> ModelInfo:
    """Load and warm a version; with `default`, it then takes the default traffic."""
    try:
        await registry.load(name, version, make_default=body is not None and body.default)
    except RepositoryError as exc:
        raise LoadFailed(str(exc)) from None
    return _model_info(registry, name)


@router.post(
    "/v1/admin/models/{name}/versions/{version}/unload", tags=["admin"], dependencies=admin
)
async def unload_version(name: str, version: int, registry: Registry) -> UnloadResponse:
    """Stop routing to a version, let it finish what it holds, then free it."""
    drained = await registry.unload(name, version)
    return UnloadResponse(model=name, version=str(version), drained=drained)


@router.put("/v1/admin/models/{name}/default", tags=["admin"], dependencies=admin)
async def set_default(name: str, body: DefaultRequest, registry: Registry) -> ModelInfo:
    """Send unpinned requests to another loaded version, at once."""
    registry.set_default(name, body.version)
    return _model_info(registry, name)
