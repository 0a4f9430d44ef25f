"""The model repository on disk: `<root>/<name>/config.yaml` and `<root>/<name>/<version>/`.

Triton-like layout. Each version directory holds `model.onnx` and `metadata.json`; the
metadata names the sha256 of the model and of every auxiliary file (a tokenizer, say), and
a file whose digest does not match is refused. The builders of the built-in models write
through `write_version`, the service reads through `Repository`; both share these schemas.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import tempfile
from collections.abc import Mapping
from io import StringIO
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from narthex.inference.datatypes import DataType
from narthex.inference.traffic import check_weights

__all__ = [
    "CONFIG_FILE",
    "METADATA_FILE",
    "MODEL_FILE",
    "DynamicBatching",
    "InstanceGroup",
    "Metadata",
    "ModelConfig",
    "Preprocessing",
    "Repository",
    "RepositoryError",
    "TensorSpec",
    "VersionPolicy",
    "WarmupSample",
    "sha256_file",
    "write_config",
    "write_version",
]

CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


class RepositoryError(Exception):
    """A model directory that cannot be served, with what is wrong with it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """A public tensor of the model. `dims` exclude the batch dimension; -1 is variable."""

    name: Annotated[str, Field(min_length=1, max_length=64)]
    datatype: DataType
    dims: list[Annotated[int, Field(ge=-1)]]


class DynamicBatching(_Strict):
    max_queue_delay_ms: Annotated[float, Field(ge=0, le=10_000)] = 2.0
    preferred_batch_sizes: list[Annotated[int, Field(ge=1)]] = []
    max_queue_size: Annotated[int, Field(ge=1)] = 1024
    # Text models: the most tokens (batch x padded length) in one batch.
    max_batch_tokens: Annotated[int, Field(ge=1)] = 8192


# Instances of one version computing at once: past a few per core they only contend.
MAX_INSTANCES = 64


class InstanceGroup(_Strict):
    """Triton's `instance_group`, one group: `count` batches of a version compute at once,
    each on a runner of its own, all sharing the version's one session (ONNX Runtime's
    `run` is thread-safe; the weights are in memory once). `KIND_CPU` keeps the version
    on the CPU whatever the service's `provider`; `KIND_AUTO` follows it."""

    count: Annotated[int, Field(ge=1, le=MAX_INSTANCES)] = 1
    kind: Literal["KIND_AUTO", "KIND_CPU"] = "KIND_AUTO"


class VersionPolicy(_Strict):
    """Which versions on disk are served: the newest `latest`, or exactly `specific`."""

    latest: Annotated[int, Field(ge=1)] | None = None
    specific: list[Annotated[int, Field(ge=1)]] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> VersionPolicy:
        if (self.latest is None) == (self.specific is None):
            raise ValueError("set exactly one of `latest` and `specific`")
        return self

    def select(self, available: list[int]) -> list[int]:
        if self.specific is not None:
            return sorted(v for v in available if v in self.specific)
        assert self.latest is not None
        return sorted(available)[-self.latest :]


class Preprocessing(_Strict):
    """How a request becomes the graph's inputs. `text`: strings through the tokenizer
    file of the version directory into `input_ids`/`attention_mask`(/`token_type_ids`).
    `transaction`: v1 instances may name an `account_id` and carry only the transaction's
    own fields; the account's aggregates come from the features service, for a whole
    batch in one call, and `narthex.transactions.model_input` makes the row (instances
    with the row itself, and OIP tensors, are taken as they are)."""

    kind: Literal["none", "text", "transaction"] = "none"
    tokenizer: str = "tokenizer.json"
    max_tokens: Annotated[int, Field(ge=2, le=8192)] = 256
    # Over `max_tokens`: cut the text (true) or refuse the request (false).
    truncate: bool = True


class WarmupSample(_Strict):
    """Inputs run through a freshly loaded version before it takes traffic. Per input:
    a list of items (one batch), e.g. `{"features": [[0.0, ...]]}` or `{"text": ["hi"]}`."""

    name: str = "warmup"
    inputs: dict[str, list[Any]]
    count: Annotated[int, Field(ge=1, le=100)] = 1


class ModelConfig(_Strict):
    name: str
    platform: Literal["onnxruntime_onnx"] = "onnxruntime_onnx"
    description: str = ""
    max_batch_size: Annotated[int, Field(ge=1, le=4096)]
    # The most items one request may carry (a plan may lower it at the gateway).
    max_items_per_request: Annotated[int, Field(ge=1)] = 100
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    dynamic_batching: DynamicBatching = DynamicBatching()
    # Exactly one group (Triton's shape, e.g. `[{count: 2, kind: KIND_CPU}]`): several
    # groups would place instances on different devices, and a version has one session.
    instance_group: list[InstanceGroup] = [InstanceGroup()]
    version_policy: VersionPolicy = VersionPolicy(latest=1)
    # Served when a request pins no version; unset: the newest loaded one.
    default_version: Annotated[int, Field(ge=1)] | None = None
    # A model-level canary: weights (summing to 100) between served versions, e.g.
    # `{1: 90, 2: 10}`; unpinned requests are split by them (narthex.inference.traffic).
    # Unset: they all go to the default version.
    traffic: dict[Annotated[int, Field(ge=1)], Annotated[StrictInt, Field(ge=0)]] | None = None
    preprocessing: Preprocessing = Preprocessing()
    warmup: list[WarmupSample] = []

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if not _NAME.match(self.name):
            raise ValueError(f"model name {self.name!r}: lowercase letters, digits, _ . -")
        names = [t.name for t in (*self.inputs, *self.outputs)]
        if len(set(names)) != len(names):
            raise ValueError("input and output names must be unique")
        if self.preprocessing.kind == "text" and [t.datatype for t in self.inputs] != ["BYTES"]:
            raise ValueError("a text model has exactly one BYTES input")
        for sample in self.warmup:
            unknown = set(sample.inputs) - {t.name for t in self.inputs}
            if unknown:
                raise ValueError(f"warmup {sample.name!r} names unknown inputs {sorted(unknown)}")
        if self.traffic is not None:
            check_weights(self.traffic)
        if len(self.instance_group) != 1:
            raise ValueError(
                f"instance_group has {len(self.instance_group)} groups; give exactly one"
                " (its `count` instances share the version's one session)"
            )
        return self

    @property
    def instances(self) -> int:
        """Batches of one version that compute at once."""
        return self.instance_group[0].count


class Metadata(BaseModel):
    """`metadata.json` of one version. Unknown fields are kept (builders may add more)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str
    version: Annotated[int, Field(ge=1)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    created_at: dt.datetime
    # Auxiliary files of the version directory and their sha256 (a tokenizer, say).
    files: dict[str, Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] = {}
    training_metrics: dict[str, float] = {}
    # The model's input features in order: [{"name": ..., "description": ...}, ...].
    feature_schema: list[dict[str, Any]] = []
    source: str = ""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_yaml = YAML(typ="safe")


def _load_yaml(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as f:
            return _yaml.load(f)
    except (OSError, YAMLError) as exc:
        raise RepositoryError(f"{path}: cannot read: {exc}") from None


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in error["loc"]) or "(root)"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


class Repository:
    """Reads and checks the repository; loads nothing into memory but configs."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def model_names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / CONFIG_FILE).is_file())

    def config(self, name: str) -> ModelConfig:
        if not _NAME.match(name):
            raise RepositoryError(f"no model named {name!r}")
        path = self.root / name / CONFIG_FILE
        if not path.is_file():
            raise RepositoryError(f"no model named {name!r} in {self.root}")
        try:
            config = ModelConfig.model_validate(_load_yaml(path))
        except ValidationError as exc:
            raise RepositoryError(f"{path}: {_describe(exc)}") from None
        if config.name != name:
            raise RepositoryError(f"{path}: names model {config.name!r}, not {name!r}")
        return config

    def versions_on_disk(self, name: str) -> list[int]:
        directory = self.root / name
        if not directory.is_dir():
            return []
        return sorted(
            int(p.name)
            for p in directory.iterdir()
            if p.is_dir() and p.name.isdigit() and (p / MODEL_FILE).is_file()
        )

    def served_versions(self, name: str, config: ModelConfig | None = None) -> list[int]:
        config = config or self.config(name)
        return config.version_policy.select(self.versions_on_disk(name))

    def version_dir(self, name: str, version: int) -> Path:
        return self.root / name / str(version)

    def metadata(self, name: str, version: int, *, verify: bool = True) -> Metadata:
        """The version's metadata; with `verify`, every file's sha256 is checked."""
        directory = self.version_dir(name, version)
        path = directory / METADATA_FILE
        try:
            metadata = Metadata.model_validate(orjson.loads(path.read_bytes()))
        except OSError as exc:
            raise RepositoryError(f"{path}: cannot read: {exc.strerror}") from None
        except orjson.JSONDecodeError as exc:
            raise RepositoryError(f"{path}: not JSON: {exc}") from None
        except ValidationError as exc:
            raise RepositoryError(f"{path}: {_describe(exc)}") from None
        if (metadata.name, metadata.version) != (name, version):
            raise RepositoryError(
                f"{path}: describes {metadata.name} v{metadata.version}, not {name} v{version}"
            )
        if verify:
            for file, expected in {MODEL_FILE: metadata.sha256, **metadata.files}.items():
                target = directory / file
                if not target.is_file():
                    raise RepositoryError(f"{target}: missing")
                actual = sha256_file(target)
                if actual != expected:
                    raise RepositoryError(
                        f"{target}: sha256 {actual} does not match {expected} in {METADATA_FILE};"
                        " the file was changed or corrupted after the build"
                    )
        return metadata


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp makes it 0600; a service running as another user must be able to read it.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_config(root: Path, config: ModelConfig) -> Path:
    """Write `<root>/<name>/config.yaml` (validated first)."""
    path = root / config.name / CONFIG_FILE
    data = config.model_dump(mode="json", exclude_none=True)
    if config.traffic is not None:
        # JSON mode makes the versions strings; YAML says `traffic: {1: 90, 2: 10}`.
        data["traffic"] = dict(config.traffic)
    out = StringIO()
    writer = YAML()
    writer.default_flow_style = None
    writer.dump(data, out)
    _atomic_write(path, out.getvalue().encode())
    return path


def write_version(
    root: Path,
    name: str,
    version: int,
    model: bytes,
    *,
    files: Mapping[str, bytes] | None = None,
    created_at: dt.datetime | None = None,
    **fields: Any,
) -> Metadata:
    """Write a version directory: the model, auxiliary files, then `metadata.json` last,
    so a half-written version (no metadata yet) is never mistaken for a complete one."""
    directory = root / name / str(version)
    aux: dict[str, str] = {}
    for file, data in (files or {}).items():
        if "/" in file or file in (MODEL_FILE, METADATA_FILE):
            raise ValueError(f"auxiliary file name {file!r} is not allowed")
        _atomic_write(directory / file, data)
        aux[file] = hashlib.sha256(data).hexdigest()
    _atomic_write(directory / MODEL_FILE, model)
    metadata = Metadata(
        name=name,
        version=version,
        sha256=hashlib.sha256(model).hexdigest(),
        created_at=created_at or dt.datetime.now(dt.UTC),
        files=aux,
        **fields,
    )
    _atomic_write(directory / METADATA_FILE, orjson.dumps(metadata.model_dump(mode="json")))
    return metadata
