"""Loaded model versions: load and warm, serve through a batcher, set the default, drain, unload.

A version takes traffic only once its session is open and its warm-up samples have run
through its own batcher. Setting the default is one assignment, so requests switch
between two warm versions without a gap. Unloading removes a version from lookup first
(new requests go elsewhere or get a clear 404), lets its batcher answer what it holds,
then closes it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from narthex.common.events import EventBuffer
from narthex.inference.batcher import Batcher, QueueFull
from narthex.inference.errors import Conflict, ModelNotFound, Unavailable
from narthex.inference.features import FeatureClient, Lookup
from narthex.inference.metrics import InferenceMetrics, VersionMetrics
from narthex.inference.oip import DATATYPES
from narthex.inference.predictions import score_events
from narthex.inference.repository import (
    MODEL_FILE,
    Metadata,
    ModelConfig,
    Repository,
    RepositoryError,
    TensorSpec,
)
from narthex.inference.runtime import Session
from narthex.inference.text import TextEncoder
from narthex.transactions import DEFAULTS, Transaction, model_input

__all__ = ["DEGRADED", "LoadedVersion", "ModelRegistry", "Scoring"]

log = structlog.get_logger("narthex.inference.models")

Array = np.ndarray[Any, Any]
# Who the warm-up requests are queued for: no tenant's share of a queue.
WARMUP_TENANT = ""
# The extra output of a scored transaction: its aggregates were the defaults.
DEGRADED = "degraded"
Outputs = dict[str, Array]


@dataclass(eq=False, slots=True)
class Scoring:
    """A chunk of transactions to score: their rows are made once the batch is formed,
    from aggregates looked up for the whole batch (`LoadedVersion._look_up`)."""

    transactions: list[Transaction]
    tenant: str  # whose accounts these are: each is looked up under it
    rows: Array | None = None
    degraded: bool = False


class LoadedVersion:
    """One version in memory: its session, its batcher, its metrics."""

    def __init__(
        self,
        config: ModelConfig,
        metadata: Metadata,
        session: Session,
        encoder: TextEncoder | None,
        metrics: VersionMetrics,
        features: FeatureClient | None = None,
    ) -> None:
        self.config = config
        self.metadata = metadata
        self.name = config.name
        self.version = metadata.version
        self.session = session
        self.encoder = encoder
        self.metrics = metrics
        self.outputs: list[TensorSpec] = list(config.outputs)
        self._output_names = [o.name for o in self.outputs]
        self.features = features
        self.looks_up = config.preprocessing.kind == "transaction"
        self.loaded_at = time.time()
        self.ready = False
        batching = config.dynamic_batching
        compute: Any = (
            self._compute_text
            if encoder is not None
            else self._compute_scoring
            if self.looks_up
            else self._compute_tensors
        )
        self.batcher: Batcher[Any, Outputs] = Batcher(
            compute,
            name=f"{self.name}-v{self.version}",
            max_batch_size=config.max_batch_size,
            max_delay_s=batching.max_queue_delay_ms / 1000.0,
            max_queue_size=batching.max_queue_size,
            preferred_batch_sizes=batching.preferred_batch_sizes,
            max_batch_tokens=batching.max_batch_tokens if encoder is not None else None,
            hooks=metrics.hooks(),
            prepare=self._look_up if self.looks_up else None,
        )

    @property
    def provider(self) -> str:
        return self.session.provider

    # -- compute (runs in the batcher's thread) --------------------------------------------

    def _compute_tensors(self, payloads: list[Mapping[str, Array]]) -> list[Outputs]:
        if len(payloads) == 1:
            feeds = payloads[0]
        else:
            feeds = {name: np.concatenate([p[name] for p in payloads]) for name in payloads[0]}
        outputs = self.session.run(feeds)
        if len(payloads) == 1:
            return [{name: outputs[name] for name in self._output_names}]
        offsets = np.cumsum([len(next(iter(p.values()))) for p in payloads])[:-1]
        split = {name: np.split(outputs[name], offsets) for name in self._output_names}
        return [{name: split[name][i] for name in self._output_names} for i in range(len(payloads))]

    def _compute_scoring(self, payloads: list[Scoring | Mapping[str, Array]]) -> list[Outputs]:
        """Rows given inline and rows made from looked-up aggregates, in one run."""
        name = self.config.inputs[0].name
        feeds: list[Mapping[str, Array]] = []
        for payload in payloads:
            rows = payload.rows if isinstance(payload, Scoring) else payload[name]
            assert rows is not None  # made by `_look_up` before compute
            feeds.append({name: rows})
        results = self._compute_tensors(feeds)
        for payload, result in zip(payloads, results, strict=True):
            if isinstance(payload, Scoring):
                count = len(payload.transactions)
                result[DEGRADED] = np.full(count, payload.degraded, dtype=np.bool_)
        return results

    async def _look_up(self, payloads: list[Any]) -> None:
        """One feature lookup for every account in the batch, each under its chunk's tenant
        (a batch may mix tenants), then each chunk's rows."""
        scoring = [p for p in payloads if isinstance(p, Scoring)]
        if not scoring:
            return
        entities = [(p.tenant, tx.account_id) for p in scoring for tx in p.transactions]
        if self.features is None:
            lookup = Lookup([dict(DEFAULTS) for _ in entities], degraded=True, reason="none")
        else:
            lookup = await self.features.lookup(entities, at=time.time())
        values = iter(lookup.values)
        for payload in scoring:
            payload.rows = np.asarray(
                [model_input(tx, next(values)) for tx in payload.transactions],
                dtype=np.float32,
            )
            payload.degraded = lookup.degraded

    def _compute_text(self, payloads: list[list[int]]) -> list[Outputs]:
        assert self.encoder is not None
        outputs = self.session.run(self.encoder.collate(payloads))
        return [
            {name: outputs[name][i : i + 1] for name in self._output_names}
            for i in range(len(payloads))
        ]

    # -- requests (on the event loop) ------------------------------------------------------

    async def infer(self, inputs: Mapping[str, Array], *, tenant: str, deadline: float) -> Outputs:
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

    def resolve(self, name: str, version: int | None = None) -> LoadedVersion:
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
            session = await asyncio.to_thread(
                Session,
                directory / MODEL_FILE,
                provider=self.provider,
                intra_op_threads=self.intra_op_threads,
            )
            _check_graph(config, session)
            encoder = None
            if config.preprocessing.kind == "text":
                encoder = TextEncoder(
                    directory / config.preprocessing.tokenizer,
                    max_tokens=config.preprocessing.max_tokens,
                    truncate=config.preprocessing.truncate,
                    graph_inputs=list(session.inputs),
                )
        except RepositoryError:
            raise
        except Exception as exc:
            raise RepositoryError(f"{name} v{version}: cannot load: {exc}") from exc
        loaded = LoadedVersion(
            config,
            metadata,
            session,
            encoder,
            self.metrics.version(name, version),
            features=self.features,
        )
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
            del model.versions[version]
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
