"""Loaded model versions: load and warm, serve through a batcher, set the default, drain, unload.

A version takes traffic only once its session is open and its warm-up samples have run
through its own batcher. Setting the default is one assignment, so requests switch
between two warm versions without a gap. Unloading removes a version from lookup first
(new requests go elsewhere or get a clear 404), lets its batcher answer what it holds,
then closes it. A traffic split (narthex.inference.traffic), when a model has one, decides
where its unpinned requests go instead of the default; it names only loaded versions, and
replacing it is one assignment too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from narthex.common.events import EventBuffer
from narthex.inference.batcher import Batcher, QueueFull
from narthex.inference.datatypes import DATATYPES
from narthex.inference.errors import BadSplit, Conflict, ModelNotFound, Unavailable
from narthex.inference.features import FeatureClient
from narthex.inference.kinds import (
    DEGRADED,
    Feeds,
    ModelKind,
    Outputs,
    Scoring,
    TextKind,
    TransactionKind,
    kind_for,
)
from narthex.inference.metrics import InferenceMetrics, VersionMetrics
from narthex.inference.predictions import score_events
from narthex.inference.repository import (
    MODEL_FILE,
    Metadata,
    ModelConfig,
    Repository,
    RepositoryError,
    TensorSpec,
)
from narthex.inference.runtime import Session, intra_op_threads
from narthex.inference.text import TextEncoder
from narthex.inference.traffic import Split, check_weights
from narthex.transactions import Transaction

__all__ = ["LoadedVersion", "ModelRegistry"]

log = structlog.get_logger("narthex.inference.models")

# Who the warm-up requests are queued for: no tenant's share of a queue.
WARMUP_TENANT = ""


class LoadedVersion:
    """One version in memory: its session, its model kind, its batcher, its metrics."""

    def __init__(
        self,
        config: ModelConfig,
        metadata: Metadata,
        session: Session,
        kind: ModelKind,
        metrics: VersionMetrics,
    ) -> None:
        self.config = config
        self.metadata = metadata
        self.name = config.name
        self.version = metadata.version
        self.session = session
        self.kind = kind
        self.metrics = metrics
        self.outputs: list[TensorSpec] = list(config.outputs)
        self._output_names = [o.name for o in self.outputs]
        self.loaded_at = time.time()
        self.ready = False
        batching = config.dynamic_batching
        self.batcher: Batcher[Any, Outputs] = Batcher(
            kind,
            name=f"{self.name}-v{self.version}",
            max_batch_size=config.max_batch_size,
            max_delay_s=batching.max_queue_delay_ms / 1000.0,
            max_queue_size=batching.max_queue_size,
            preferred_batch_sizes=batching.preferred_batch_sizes,
            max_batch_tokens=batching.max_batch_tokens if isinstance(kind, TextKind) else None,
            hooks=metrics.hooks(),
            instances=config.instances,
        )

    @property
    def provider(self) -> str:
        return self.session.provider

    @property
    def encoder(self) -> TextEncoder | None:
        """A text model's tokenizer; None for the other kinds."""
        return self.kind.encoder if isinstance(self.kind, TextKind) else None

    @property
    def looks_up(self) -> bool:
        """Scores transactions on looked-up aggregates (as well as rows given inline)."""
        return isinstance(self.kind, TransactionKind)

    # -- requests (on the event loop) ------------------------------------------------------

    async def infer(self, inputs: Feeds, *, tenant: str, deadline: float) -> Outputs:
        """Rows of already validated tensors through the batcher; outputs row-aligned."""
        rows = len(next(iter(inputs.values())))
        chunks = [
            ({name: array[span] for name, array in inputs.items()}, span.stop - span.start, 0)
            for span in _spans(rows, self.config.max_batch_size)
        ]
        parts = await self._submit(chunks, rows, tenant, deadline)
        return _join(parts, self._output_names)

    async def score(
        self,
        transactions: Sequence[Transaction],
        *,
        tenant: str,
        deadline: float,
    ) -> Outputs:
        """Transactions whose accounts' aggregates are looked up when their batch forms;
        outputs row-aligned, plus `degraded` per row."""
        chunks = [
            (Scoring(list(transactions[span]), tenant), span.stop - span.start, 0)
            for span in _spans(len(transactions), self.config.max_batch_size)
        ]
        parts = await self._submit(chunks, len(transactions), tenant, deadline)
        return _join(parts, [*self._output_names, DEGRADED])

    async def embed(self, ids: Sequence[list[int]], *, tenant: str, deadline: float) -> Outputs:
        """Token ids (one list per text) through the batcher; one output row per text."""
        chunks = [(one, 1, len(one)) for one in ids]
        parts = await self._submit(chunks, len(ids), tenant, deadline)
        return _join(parts, self._output_names)

    def check(self, items: int, *, tenant: str) -> None:
        """Refuse now (`QueueFull`) what the batcher would refuse, before work that only an
        admitted request needs; counted as a failed request, as a refusal at submit is."""
        try:
            self.batcher.check(items, tenant=tenant)
        except QueueFull:
            self.metrics.requests_failed.inc()
            raise

    async def _submit(
        self, chunks: list[tuple[Any, int, int]], items: int, tenant: str, deadline: float
    ) -> list[Outputs]:
        started = time.monotonic()
        try:
            parts = await self.batcher.submit(chunks, tenant=tenant, deadline=deadline)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.metrics.requests_failed.inc()
            raise
        self.metrics.requests_ok.inc()
        self.metrics.items.inc(items)
        self.metrics.request_seconds.observe(time.monotonic() - started)
        return parts

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": str(self.version),
            "state": "READY" if self.ready else "LOADING",
            "provider": self.provider,
            "providers": self.session.providers,
            "loaded_at": self.loaded_at,
            "sha256": self.metadata.sha256,
            "training_metrics": self.metadata.training_metrics,
            "created_at": self.metadata.created_at.isoformat(),
        }


def _spans(count: int, step: int) -> list[slice]:
    """Consecutive slices of at most `step` items that cover `count`: a chunk each."""
    return [slice(start, min(start + step, count)) for start in range(0, count, step)]


def _join(parts: list[Outputs], names: list[str]) -> Outputs:
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([p[name] for p in parts]) for name in names}


@dataclass
class _Model:
    config: ModelConfig
    versions: dict[int, LoadedVersion]
    default: int | None = None
    split: Split | None = None


class ModelRegistry:
    """Every loaded version, the default per model, and the admin operations on them."""

    def __init__(
        self,
        repository: Repository,
        metrics: InferenceMetrics,
        *,
        provider: str = "auto",
        intra_op_threads: int = 0,
        drain_timeout: float = 30.0,
        features: FeatureClient | None = None,
        predictions: EventBuffer | None = None,
    ) -> None:
        self.repository = repository
        self.features = features
        self.predictions = predictions
        self.metrics = metrics
        self.provider = provider
        self.intra_op_threads = intra_op_threads
        self.drain_timeout = drain_timeout
        self._models: dict[str, _Model] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    # -- lookup (hot path) -----------------------------------------------------------------

    def route(
        self, name: str, version: int | None, *, tenant: str, key: str | None = None
    ) -> LoadedVersion:
        """The version that serves a request: the pinned `version`, else the split's choice
        for `tenant` (by `key` when given), else the default. Each unpinned call is a turn of
        the split: for requests only (metadata and readiness `resolve`)."""
        model = self._models.get(name)
        if version is None and model is not None and model.split is not None:
            version = model.split.choose(tenant, key)
        return self.resolve(name, version)

    def resolve(self, name: str, version: int | None = None) -> LoadedVersion:
        """The pinned `version`, else the default one."""
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(f"no model named {name!r} is loaded")
        if version is None:
            if model.default is None:
                raise Unavailable(f"{name} has no version ready")
            version = model.default
        loaded = model.versions.get(version)
        if loaded is None or not loaded.ready:
            raise ModelNotFound(f"{name} has no version {version} loaded")
        return loaded

    def config(self, name: str) -> ModelConfig:
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(f"no model named {name!r} is loaded")
        return model.config

    def names(self) -> list[str]:
        return sorted(self._models)

    def default_version(self, name: str) -> int | None:
        model = self._models.get(name)
        return None if model is None else model.default

    def traffic(self, name: str) -> dict[int, int] | None:
        """The model's split (version -> weight), None when unpinned requests go to the
        default version."""
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(f"no model named {name!r} is loaded")
        return None if model.split is None else dict(model.split.weights)

    def versions(self, name: str) -> list[LoadedVersion]:
        model = self._models.get(name)
        return [] if model is None else [model.versions[v] for v in sorted(model.versions)]

    def ready(self) -> bool:
        """Every loaded model has a warm default version (an empty repository is ready:
        there is nothing to warm; naming a model that is not there fails at start)."""
        return all(
            m.default is not None and m.versions[m.default].ready for m in self._models.values()
        )

    # -- loading ---------------------------------------------------------------------------

    async def load_all(self, names: Sequence[str] = ()) -> None:
        """At start: each named model (every one on disk by default), its served versions."""
        for name in names or self.repository.model_names():
            config = self._read_config(name)
            versions = self.repository.served_versions(name, config)
            if not versions:
                raise RepositoryError(f"{name}: no version on disk matches its version policy")
            for version in versions:
                await self.load(name, version)
            model = self._models[name]
            chosen = config.default_version or max(versions)
            if chosen not in model.versions:
                raise RepositoryError(f"{name}: default_version {chosen} is not served")
            self.set_default(name, chosen)
            if config.traffic is not None:
                try:
                    self.set_traffic(name, config.traffic)
                except BadSplit as exc:
                    raise RepositoryError(f"traffic in config.yaml: {exc.detail}") from None

    def _read_config(self, name: str) -> ModelConfig:
        try:
            return self.repository.config(name)
        except RepositoryError as exc:
            raise ModelNotFound(str(exc)) from None

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def load(self, name: str, version: int, *, make_default: bool = False) -> LoadedVersion:
        """Load and warm `version`; it takes traffic only after that (default or pinned)."""
        async with self._lock(name):
            model = self._models.get(name)
            existing = model.versions.get(version) if model is not None else None
            if existing is None:
                existing = await self._load(name, version)
        if make_default:
            self.set_default(name, version)
        return existing

    async def _load(self, name: str, version: int) -> LoadedVersion:
        started = time.monotonic()
        config = self._read_config(name)
        if version not in self.repository.versions_on_disk(name):
            raise ModelNotFound(f"{name} has no version {version} in the repository")
        directory = self.repository.version_dir(name, version)
        try:
            # Hashing and session creation take a while for big models: off the loop.
            metadata = await asyncio.to_thread(self.repository.metadata, name, version)
            group = config.instance_group[0]
            session = await asyncio.to_thread(
                Session,
                directory / MODEL_FILE,
                provider="cpu" if group.kind == "KIND_CPU" else self.provider,
                intra_op_threads=intra_op_threads(self.intra_op_threads, group.count),
            )
            _check_graph(config, session)
            kind = kind_for(config, session, directory, self.features)
        except RepositoryError:
            raise
        except Exception as exc:
            raise RepositoryError(f"{name} v{version}: cannot load: {exc}") from exc
        loaded = LoadedVersion(config, metadata, session, kind, self.metrics.version(name, version))
        loaded.batcher.start()
        try:
            await self._warm(loaded)
            # After the warm-up: its rows are no one's predictions.
            events = score_events(
                self.predictions,
                name,
                version,
                metadata.model_extra,
                [o.name for o in loaded.outputs],
            )
            if events is not None:
                loaded.batcher.on_computed(events.computed)
        except BaseException:
            await loaded.batcher.close()
            raise
        loaded.ready = True
        model = self._models.setdefault(name, _Model(config, {}))
        model.config = config
        model.versions[version] = loaded
        self._publish_weights(model)
        seconds = time.monotonic() - started
        self.metrics.load_seconds.labels(name, str(version)).observe(seconds)
        self.metrics.loaded.labels(name, str(version), loaded.provider).set(1)
        log.info(
            "model version loaded",
            model=name,
            version=version,
            provider=loaded.provider,
            seconds=round(seconds, 3),
        )
        return loaded

    async def _warm(self, loaded: LoadedVersion) -> None:
        for sample in loaded.config.warmup:
            for _ in range(sample.count):
                if loaded.encoder is not None:
                    texts = next(iter(sample.inputs.values()))
                    await loaded.embed(
                        loaded.encoder.encode(texts), tenant=WARMUP_TENANT, deadline=float("inf")
                    )
                else:
                    arrays = {
                        spec.name: np.asarray(
                            sample.inputs[spec.name], dtype=DATATYPES[spec.datatype]
                        )
                        for spec in loaded.config.inputs
                    }
                    await loaded.infer(arrays, tenant=WARMUP_TENANT, deadline=float("inf"))

    def set_default(self, name: str, version: int) -> None:
        model = self._models.get(name)
        loaded = model.versions.get(version) if model is not None else None
        if model is None or loaded is None or not loaded.ready:
            raise ModelNotFound(f"{name} has no version {version} loaded; load it first")
        model.default = version
        self.metrics.default_version.labels(name).set(version)
        log.info("default version set", model=name, version=version)
        if model.split is not None:
            # Choosing the default is choosing where every unpinned request goes.
            model.split = None
            log.info("traffic split ended by the new default", model=name, version=version)
        self._publish_weights(model)

    def set_traffic(self, name: str, weights: Mapping[int, int] | None) -> dict[int, int] | None:
        """Split unpinned requests by `weights` (version -> weight, summing to 100, every
        version loaded and ready), or with None send them all to the default again.
        Invalid weights change nothing (BadSplit). Takes effect with the next request; a
        new split starts every tenant's round robin afresh."""
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(f"no model named {name!r} is loaded")
        if weights is None:
            split = None
        else:
            ready = [v for v, loaded in model.versions.items() if loaded.ready]
            try:
                check_weights(weights, ready)
            except ValueError as exc:
                raise BadSplit(f"{name}: {exc}") from None
            split = Split(name, weights)
        model.split = split
        self._publish_weights(model)
        shown = None if split is None else {f"v{v}": w for v, w in split.weights.items()}
        log.info("traffic split set", model=name, weights=shown)
        return self.traffic(name)

    def _publish_weights(self, model: _Model) -> None:
        for version in model.versions:
            if model.split is not None:
                weight = model.split.weights.get(version, 0)
            else:
                weight = 100 if version == model.default else 0
            self.metrics.traffic_weight.labels(model.config.name, str(version)).set(weight)

    async def unload(self, name: str, version: int) -> bool:
        """Stop routing to `version`, let it answer what it holds, close it. True if drained
        in time (otherwise whatever was still waiting was failed)."""
        async with self._lock(name):
            model = self._models.get(name)
            loaded = model.versions.get(version) if model is not None else None
            if model is None or loaded is None:
                raise ModelNotFound(f"{name} has no version {version} loaded")
            if model.default == version:
                raise Conflict(f"v{version} is {name}'s default version; set another default first")
            if model.split is not None and version in model.split.weights:
                if model.split.weights[version] > 0:
                    raise Conflict(
                        f"v{version} takes {model.split.weights[version]}% of {name}'s traffic;"
                        " set its weight to 0 first"
                    )
                rest = {v: w for v, w in model.split.weights.items() if v != version}
                model.split = Split(name, rest)
            del model.versions[version]
            self._publish_weights(model)
            with contextlib.suppress(KeyError):  # never published: nothing to remove
                self.metrics.traffic_weight.remove(name, str(version))
            drained = await loaded.batcher.drain(self.drain_timeout)
            await loaded.batcher.close()
            self.metrics.loaded.labels(name, str(version), loaded.provider).set(0)
            log.info("model version unloaded", model=name, version=version, drained=drained)
            return drained

    async def close(self) -> None:
        for model in self._models.values():
            for loaded in model.versions.values():
                await loaded.batcher.close()
        self._models.clear()


def _check_graph(config: ModelConfig, session: Session) -> None:
    """The config's tensors must be the graph's: refused at load, not on the first request."""
    if config.preprocessing.kind == "text":
        needed = {"input_ids", "attention_mask"}
        if not needed <= set(session.inputs):
            raise RepositoryError(f"{config.name}: a text model's graph needs inputs {needed}")
    else:
        for spec in config.inputs:
            graph = session.inputs.get(spec.name)
            if graph is None:
                raise RepositoryError(f"{config.name}: the graph has no input {spec.name!r}")
            _same_tensor(config.name, spec, graph.datatype, graph.shape)
        missing = set(session.inputs) - {s.name for s in config.inputs}
        if missing:
            raise RepositoryError(f"{config.name}: graph inputs {sorted(missing)} not in config")
    for spec in config.outputs:
        graph = session.outputs.get(spec.name)
        if graph is None:
            raise RepositoryError(f"{config.name}: the graph has no output {spec.name!r}")
        _same_tensor(config.name, spec, graph.datatype, graph.shape)


def _same_tensor(
    model: str, spec: TensorSpec, datatype: str, shape: tuple[int | str | None, ...]
) -> None:
    if datatype != spec.datatype:
        raise RepositoryError(
            f"{model}: {spec.name} is {datatype} in the graph, not {spec.datatype}"
        )
    if len(shape) != len(spec.dims) + 1:
        raise RepositoryError(
            f"{model}: {spec.name} has rank {len(shape)} in the graph; the config says"
            f" batch + {spec.dims}"
        )
    for declared, actual in zip(spec.dims, shape[1:], strict=True):
        if declared != -1 and isinstance(actual, int) and actual != declared:
            raise RepositoryError(f"{model}: {spec.name} dims {list(shape[1:])} != {spec.dims}")
