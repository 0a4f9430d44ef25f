"""HTTP routes: Open Inference Protocol v2, v1 predict, OpenAI embeddings, model admin.

Every answer names the version that served it in its body (as its protocol has it) and in
`VERSION_HEADER`, the same for every protocol, so that a caller of a traffic split can
tell which side answered without parsing three formats."""

from __future__ import annotations

import asyncio
import base64
from typing import Annotated, Any, TypedDict

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Header, Request, Response

from narthex.common import scopes
from narthex.common.authn import CurrentPrincipal, require_admin, require_scope
from narthex.common.codings import decode_content
from narthex.common.openapi import error_responses
from narthex.inference import oip
from narthex.inference.errors import InvalidInput, ModelNotFound
from narthex.inference.features import FeatureClient
from narthex.inference.kinds import DEGRADED
from narthex.inference.models import LoadedVersion, ModelRegistry
from narthex.inference.repository import TensorSpec
from narthex.inference.schemas import (
    DefaultRequest,
    EmbeddingsRequest,
    EmbeddingsResponse,
    LoadRequest,
    ModelInfo,
    ModelList,
    PredictRequest,
    PredictResponse,
    Traffic,
    TrafficRequest,
    UnloadResponse,
    VersionInfo,
)
from narthex.inference.service import InferenceService, ModelState, Tensor
from narthex.inference.settings import InferenceSettings
from narthex.inference.traffic import KEY_HEADER, KEY_MAX_LENGTH

SERVER_NAME = "narthex"
SERVER_VERSION = "0.1.0"
PUBLIC_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
VERSION_HEADER = "x-narthex-model-version"


class InferenceState(TypedDict):
    """What the inference lifespan yields; each request finds it in `scope["state"]`."""

    service: InferenceService
    registry: ModelRegistry
    features: FeatureClient
    settings: InferenceSettings


async def _service(request: Request) -> InferenceService:
    service: InferenceService = request.scope["state"]["service"]
    return service


async def _settings(request: Request) -> InferenceSettings:
    settings: InferenceSettings = request.scope["state"]["settings"]
    return settings


Service = Annotated[InferenceService, Depends(_service)]
Settings = Annotated[InferenceSettings, Depends(_settings)]
# Keeps an unpinned caller on one version of a split (a user id, a session): hashed.
CanaryKey = Annotated[
    str | None,
    Header(
        alias=KEY_HEADER,
        max_length=KEY_MAX_LENGTH,
        description="requests with the same key go to the same version while the weights stand",
    ),
]

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


# Probes answer with a status and no body, as the protocol says.
_EMPTY: dict[str, Any] = {"content": {}}
_PROBE: dict[int | str, dict[str, Any]] = {
    200: {"description": "Yes", **_EMPTY},
    503: {"description": "Not (yet)", **_EMPTY},
}


@router.get(
    "/v2/health/live",
    tags=["oip"],
    summary="The server answers",
    response_class=Response,
    responses=_PROBE,
)
async def server_live() -> Response:
    return Response(status_code=200)


@router.get(
    "/v2/health/ready",
    tags=["oip"],
    summary="Every default model version is warm",
    response_class=Response,
    responses=_PROBE,
)
async def server_ready(service: Service) -> Response:
    return Response(status_code=200 if service.ready() else 503)


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": [-1, *spec.dims]}


def _model_metadata(service: InferenceService, name: str, version: str | None) -> dict[str, Any]:
    loaded = service.version(name, _version(version))
    config = loaded.config
    return {
        "name": name,
        "versions": [str(v.version) for v in service.model(name).versions],
        "platform": config.platform,
        "inputs": [_tensor_metadata(t) for t in config.inputs],
        "outputs": [_tensor_metadata(t) for t in config.outputs],
        "parameters": {"version": str(loaded.version), "provider": loaded.provider},
    }


@router.get("/v2/models/{name}", tags=["oip"], dependencies=inference)
async def model_metadata(name: str, service: Service) -> dict[str, Any]:
    return _model_metadata(service, name, None)


@router.get("/v2/models/{name}/versions/{version}", tags=["oip"], dependencies=inference)
async def model_version_metadata(name: str, version: str, service: Service) -> dict[str, Any]:
    return _model_metadata(service, name, version)


def _ready(service: InferenceService, name: str, version: str | None) -> Response:
    return Response(status_code=200 if service.model_ready(name, _version(version)) else 503)


@router.get(
    "/v2/models/{name}/ready",
    tags=["oip"],
    dependencies=inference,
    response_class=Response,
    responses=_PROBE,
)
async def model_ready(name: str, service: Service) -> Response:
    return _ready(service, name, None)


@router.get(
    "/v2/models/{name}/versions/{version}/ready",
    tags=["oip"],
    dependencies=inference,
    response_class=Response,
    responses=_PROBE,
)
async def model_version_ready(name: str, version: str, service: Service) -> Response:
    return _ready(service, name, version)


@router.get("/v2/models/{name}/config", tags=["oip"], dependencies=inference)
async def model_config(name: str, service: Service) -> dict[str, Any]:
    config = service.model(name).config
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
    key = request.headers.get(KEY_HEADER)
    if key is not None and len(key) > KEY_MAX_LENGTH:
        raise InvalidInput(f"{KEY_HEADER} is over {KEY_MAX_LENGTH} characters")
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
    tensors = [Tensor(t.name, t.datatype, t.shape, t.data) for t in decoded.inputs]
    loaded, results = await service.infer(
        name,
        _version(version),
        tensors,
        tenant=caller.tenant,
        key=key,
        outputs=[o.name for o in decoded.outputs],
    )
    body, header_length = oip.encode_response(
        model_name=name,
        model_version=str(loaded.version),
        request_id=decoded.id,
        outputs=oip.select_outputs(decoded, results),
    )
    headers = {VERSION_HEADER: str(loaded.version)}
    if header_length is None:
        return Response(body, media_type=oip.JSON_CONTENT_TYPE, headers=headers)
    headers[oip.HEADER_LENGTH] = str(header_length)
    return Response(body, media_type=oip.BINARY_CONTENT_TYPE, headers=headers)


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


def _json(content: Any, loaded: LoadedVersion) -> Response:
    """A JSON response written by orjson straight from numpy arrays, naming the version that
    computed it. The hot routes skip FastAPI's response validation this way: 384 floats per
    embedding through pydantic cost more than the model's own time per text. Their
    `response_model` still documents them."""
    return Response(
        orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY),
        media_type="application/json",
        headers={VERSION_HEADER: str(loaded.version)},
    )


async def _predict(
    service: InferenceService,
    name: str,
    version: str | None,
    body: PredictRequest,
    caller: CurrentPrincipal,
    key: str | None,
) -> Response:
    loaded, outputs = await service.predict_rows(
        name, _version(version), body.instances, tenant=caller.tenant, key=key
    )
    return _json(
        {
            "model": name,
            "version": str(loaded.version),
            "predictions": _predictions(loaded, outputs),
        },
        loaded,
    )


@router.post(
    "/v1/models/{name}/predict",
    tags=["v1"],
    dependencies=inference,
    response_model=PredictResponse,
)
async def predict(
    name: str,
    body: PredictRequest,
    service: Service,
    caller: CurrentPrincipal,
    key: CanaryKey = None,
) -> Response:
    """Predictions for JSON instances from the version the model's split (or default) gives."""
    return await _predict(service, name, None, body, caller, key)


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
    """Predictions from a pinned version (whatever the model's split)."""
    return await _predict(service, name, version, body, caller, None)


def _model_info(model: ModelState) -> ModelInfo:
    default = model.default
    versions = model.versions
    return ModelInfo(
        id=model.config.name,
        created=int(min((v.metadata.created_at.timestamp() for v in versions), default=0)),
        default_version=None if default is None else str(default),
        traffic=_weights(model.traffic),
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
async def list_models(service: Service) -> ModelList:
    """Loaded models and versions (OpenAI's list shape, with narthex's fields)."""
    return ModelList(data=[_model_info(model) for model in service.models()])


@router.get("/v1/models/{name}", tags=["v1"], dependencies=inference)
async def get_model(name: str, service: Service) -> ModelInfo:
    return _model_info(service.model(name))


# -- OpenAI-compatible embeddings -------------------------------------------------------------


@router.post(
    "/v1/embeddings",
    tags=["openai"],
    dependencies=inference,
    response_model=EmbeddingsResponse,
    responses=error_responses(404),
)
async def embeddings(
    body: EmbeddingsRequest, service: Service, caller: CurrentPrincipal, key: CanaryKey = None
) -> Response:
    """OpenAI's embeddings API: `openai.OpenAI(base_url=.../v1).embeddings.create(...)`."""
    # narthex.inference.embeddings answers this path ahead of the router, with the same
    # checks in the same order; this route describes it, and answers where that is not in
    # front (an app built without it).
    return await answer_embeddings(service, body, tenant=caller.tenant, key=key)


async def answer_embeddings(
    service: InferenceService, body: EmbeddingsRequest, *, tenant: str, key: str | None
) -> Response:
    """The answer to a validated embeddings request from an authorized caller: the one
    implementation behind the route and the fast path."""
    name, _, pinned = body.model.partition(":")
    texts = [body.input] if isinstance(body.input, str) else body.input
    result = await service.embed(name, _version(pinned or None), texts, tenant=tenant, key=key)
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
        result.model,
    )


# -- admin ----------------------------------------------------------------------------------

admin = [require_admin()]


@router.post("/v1/admin/models/{name}/versions/{version}/load", tags=["admin"], dependencies=admin)
async def load_version(
    name: str, version: int, service: Service, body: LoadRequest | None = None
) -> ModelInfo:
    """Load and warm a version; with `default`, it then takes the default traffic."""
    model = await service.load(name, version, make_default=body is not None and body.default)
    return _model_info(model)


@router.post(
    "/v1/admin/models/{name}/versions/{version}/unload", tags=["admin"], dependencies=admin
)
async def unload_version(name: str, version: int, service: Service) -> UnloadResponse:
    """Stop routing to a version, let it finish what it holds, then free it."""
    drained = await service.unload(name, version)
    return UnloadResponse(model=name, version=str(version), drained=drained)


@router.put("/v1/admin/models/{name}/default", tags=["admin"], dependencies=admin)
async def set_default(name: str, body: DefaultRequest, service: Service) -> ModelInfo:
    """Send unpinned requests to another loaded version, at once (ending a traffic split)."""
    return _model_info(service.set_default(name, body.version))


def _weights(weights: dict[int, int] | None) -> dict[str, int] | None:
    return None if weights is None else {str(v): w for v, w in weights.items()}


def _traffic(model: ModelState) -> Traffic:
    default = model.default
    return Traffic(
        model=model.config.name,
        weights=_weights(model.traffic),
        default_version=None if default is None else str(default),
        key_header=KEY_HEADER,
    )


@router.get("/v1/admin/models/{name}/traffic", tags=["admin"], dependencies=admin)
async def get_traffic(name: str, service: Service) -> Traffic:
    """Where the model's unpinned requests go: its split, or (`weights` null) the default."""
    return _traffic(service.model(name))


@router.put("/v1/admin/models/{name}/traffic", tags=["admin"], dependencies=admin)
async def set_traffic(name: str, body: TrafficRequest, service: Service) -> Traffic:
    """Split unpinned requests between loaded versions by weights summing to 100 (a
    model-level canary), from the next request on. Invalid weights change nothing (422).
    Held in memory, as the default is: `traffic` in config.yaml is the split at start."""
    return _traffic(service.set_traffic(name, body.weights))


@router.delete("/v1/admin/models/{name}/traffic", tags=["admin"], dependencies=admin)
async def clear_traffic(name: str, service: Service) -> Traffic:
    """End the split: unpinned requests all go to the default version again."""
    return _traffic(service.set_traffic(name, None))
