"""Request and response bodies of the v1, OpenAI-compatible and admin routes."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instances: Annotated[
        list[Any],
        Field(
            description="one item per instance: a list of feature values, an object by"
            " feature name, or a string for a text model"
        ),
    ]


class PredictResponse(BaseModel):
    model: str
    version: str
    predictions: list[dict[str, Any]]


class EmbeddingsRequest(BaseModel):
    """OpenAI's `POST /v1/embeddings`; unknown fields are ignored, as OpenAI does."""

    model_config = ConfigDict(extra="ignore")

    input: str | list[str] = Field(description="a text or a list of texts")
    model: str = Field(description="`minilm`, or `minilm:1` to pin a version")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class VersionInfo(BaseModel):
    version: str
    state: str
    provider: str
    default: bool
    sha256: str
    created_at: str
    training_metrics: dict[str, float]


class ModelInfo(BaseModel):
    """An entry of `GET /v1/models`: OpenAI's model object plus narthex's own fields."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "narthex"
    default_version: str | None
    # The model-level canary: version -> percent of unpinned requests; None: all to default.
    traffic: dict[str, int] | None = None
    versions: list[VersionInfo]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: bool = Field(False, description="make it the default once it is warm")


class DefaultRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Annotated[int, Field(ge=1)]


class UnloadResponse(BaseModel):
    model: str
    version: str
    drained: bool


class TrafficRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights: dict[int, StrictInt] = Field(
        description='version -> percent of unpinned requests, summing to 100: {"1": 90, "2": 10}'
    )


class Traffic(BaseModel):
    """Where a model's unpinned requests go: split by `weights`, or (None) to the default."""

    model: str
    weights: dict[str, int] | None
    default_version: str | None
    key_header: str = Field(description="the request header that keeps a caller on one version")
