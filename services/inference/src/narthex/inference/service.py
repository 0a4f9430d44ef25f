"""What every inference protocol asks of a model: checked inputs in, outputs and the version out.

Protocol-neutral: the OIP, v1 and OpenAI routes decode their own wire formats, call these,
and encode the answer. Every check that can refuse a request runs before it is queued.
The metadata and admin routes read and change the loaded models here too: the routes
call only this service, and which version serves a request is decided once, in
`_with_model`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from narthex.common.deadline import deadline_at
from narthex.inference.batcher import (
    FULL,
    BatcherClosed,
    ComputeFailed,
    DeadlineExpired,
    QueueFull,
)
from narthex.inference.datatypes import DATATYPES
from narthex.inference.errors import (
    ComputeError,
    DeadlineExceeded,
    InvalidInput,
    LoadFailed,
    Overloaded,
    Unavailable,
)
from narthex.inference.kinds import Array, Outputs, TextKind
from narthex.inference.models import LoadedVersion, ModelRegistry
from narthex.inference.repository import ModelConfig, RepositoryError, TensorSpec
from narthex.inference.text import TextTooLong
from narthex.transactions import InvalidTransaction, Transaction

__all__ = ["Embeddings", "InferenceService", "ModelState", "Tensor"]

T = TypeVar("T")

# Texts up to this many characters in all are tokenized on the event loop: a thread hop
# costs more than tokenizing them (one short text: ~30 us inline, ~60 us in a thread).
INLINE_TOKENIZE_CHARS = 1024


@dataclass(frozen=True, slots=True)
class Tensor:
    """A decoded request tensor: OIP datatype, shape, values (object array for BYTES)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Array


@dataclass(frozen=True, slots=True)
class Embeddings:
    model: LoadedVersion
    vectors: Array  # [n, dim] float32, L2-normalised by the graph
    tokens: list[int]  # per text, after truncation


@dataclass(frozen=True, slots=True)
class ModelState:
    """A loaded model as the metadata and admin routes show it."""

    config: ModelConfig
    versions: list[LoadedVersion]  # in version order
    default: int | None
    traffic: dict[int, int] | None  # version -> weight; None: unpinned requests go to default


class InferenceService:
    def __init__(
        self,
        registry: ModelRegistry,
        *,
        request_timeout: float,
        max_text_bytes: int,
        refusal_hold: float = 0.0,
    ) -> None:
        self.registry = registry
        self.request_timeout = request_timeout
        self.max_text_bytes = max_text_bytes
        self.refusal_hold = refusal_hold
        self.wait: Callable[[float], Awaitable[None]] = asyncio.sleep  # a seam for tests

    def _deadline(self) -> float:
        return min(deadline_at(), time.monotonic() + self.request_timeout)

    async def infer(
        self,
        name: str,
        version: int | None,
        tensors: Sequence[Tensor],
        *,
        tenant: str,
        key: str | None = None,
        outputs: Sequence[str] = (),
    ) -> tuple[LoadedVersion, Outputs]:
        """Run named input tensors through a model (text models take one BYTES tensor)
        for the caller's `tenant` (every method here takes it: queues are shared). An
        unpinned request (`version` None) goes where the model's traffic split sends it,
        by `key` when the caller gave one (`ModelRegistry.route`). `outputs`: the names
        the caller asks for (all when empty); an unknown one is refused first."""
        # Against the config: a refused request takes no turn of the split.
        _check_outputs(self.registry.config(name), outputs)

        async def attempt(loaded: LoadedVersion) -> tuple[LoadedVersion, Outputs]:
            if isinstance(loaded.kind, TextKind):
                texts = _texts_from_tensor(loaded, tensors)
                embedded = await self._embed(loaded, texts, tenant)
                return loaded, {loaded.outputs[0].name: embedded.vectors}
            arrays = _check_tensors(loaded, tensors)
            return loaded, await loaded.infer(arrays, tenant=tenant, deadline=self._deadline())

        return await self._with_model(name, version, attempt, tenant, key)

    async def embed(
        self,
        name: str,
        version: int | None,
        texts: Sequence[Any],
        *,
        tenant: str,
        key: str | None = None,
    ) -> Embeddings:
        async def attempt(loaded: LoadedVersion) -> Embeddings:
            if not isinstance(loaded.kind, TextKind):
                raise InvalidInput(f"{name} is not a text model", extra={"param": "model"})
            return await self._embed(loaded, texts, tenant)

        return await self._with_model(name, version, attempt, tenant, key)

    async def predict_rows(
        self,
        name: str,
        version: int | None,
        instances: Sequence[Any],
        *,
        tenant: str,
        key: str | None = None,
    ) -> tuple[LoadedVersion, Outputs]:
        """v1 instances: one row of feature values (a list, or an object by feature name)
        per instance for a tensor model with one input; strings for a text model; for a
        transaction model also transactions naming an `account_id`, whose aggregates are
        looked up (under `tenant`, with inference's own credential)."""

        async def attempt(loaded: LoadedVersion) -> tuple[LoadedVersion, Outputs]:
            if isinstance(loaded.kind, TextKind):
                embedded = await self._embed(loaded, instances, tenant)
                return loaded, {loaded.outputs[0].name: embedded.vectors}
            if loaded.looks_up and _names_accounts(instances):
                transactions = _transactions(loaded, instances)
                outputs = await loaded.score(transactions, tenant=tenant, deadline=self._deadline())
                return loaded, outputs
            spec = _single_input(loaded)
            rows = _rows_from_instances(loaded, spec, instances)
            arrays = _check_tensors(
                loaded, [Tensor(spec.name, spec.datatype, tuple(rows.shape), rows)]
            )
            return loaded, await loaded.infer(arrays, tenant=tenant, deadline=self._deadline())

        return await self._with_model(name, version, attempt, tenant, key)

    # -- models: what the metadata and admin routes read and change ---------------------------

    def ready(self) -> bool:
        """Every loaded model has a warm default version."""
        return self.registry.ready()

    def model_ready(self, name: str, version: int | None) -> bool:
        """The pinned `version` (else the default) is loaded and warm; False for a known
        model with no version ready, ModelNotFound for an unknown model or version."""
        try:
            self.registry.resolve(name, version)
        except Unavailable:
            return False
        return True

    def version(self, name: str, version: int | None) -> LoadedVersion:
        """The pinned `version`, else the default one, as metadata describes it (not a
        request: no turn of the split)."""
        return self.registry.resolve(name, version)

    def model(self, name: str) -> ModelState:
        """A loaded model (ModelNotFound when it is not)."""
        return ModelState(
            self.registry.config(name),
            self.registry.versions(name),
            self.registry.default_version(name),
            self.registry.traffic(name),
        )

    def models(self) -> list[ModelState]:
        return [self.model(name) for name in self.registry.names()]

    async def load(self, name: str, version: int, *, make_default: bool) -> ModelState:
        """Load and warm a version; with `make_default`, it then takes the default traffic."""
        try:
            await self.registry.load(name, version, make_default=make_default)
        except RepositoryError as exc:
            raise LoadFailed(str(exc)) from None
        return self.model(name)

    async def unload(self, name: str, version: int) -> bool:
        """Stop routing to a version, let it finish what it holds, free it: True if it
        finished in time."""
        return await self.registry.unload(name, version)

    def set_default(self, name: str, version: int) -> ModelState:
        self.registry.set_default(name, version)
        return self.model(name)

    def set_traffic(self, name: str, weights: Mapping[int, int] | None) -> ModelState:
        """Split unpinned requests by `weights`, or (None) send them all to the default."""
        self.registry.set_traffic(name, weights)
        return self.model(name)

    # -- requests ----------------------------------------------------------------------------

    async def _with_model(
        self,
        name: str,
        version: int | None,
        attempt: Callable[[LoadedVersion], Awaitable[T]],
        tenant: str,
        key: str | None,
    ) -> T:
        # A version being unloaded refuses new work; the request then goes to whatever
        # now serves it (the new default), once: that is the zero-downtime swap.
        for retry in (False, True):
            loaded = self.registry.route(name, version, tenant=tenant, key=key)
            try:
                return await attempt(loaded)
            except BatcherClosed:
                if retry:
                    raise Unavailable(f"{name} v{loaded.version} is unloading") from None
            except QueueFull as exc:
                # Counted by the batcher's hooks, by reason. The message names the caller's
                # own share at most, never anyone else's load.
                if exc.reason == FULL:
                    await self._hold_refusal()
                raise Overloaded(f"{name} v{loaded.version}: {exc}; retry shortly") from None
            except DeadlineExpired:
                raise DeadlineExceeded(
                    "the request's deadline passed before the model could run it"
                ) from None
            except ComputeFailed as exc:
                raise ComputeError(str(exc)) from None
        raise AssertionError("unreachable")

    async def _hold_refusal(self) -> None:
        """Answer a refusal only after about `refusal_hold` seconds (never past the caller's
        deadline). A refusal costs the service a request's parsing and checks; a client that
        retries at once instead of honouring Retry-After would otherwise turn refusals into
        a storm that takes the CPU from every tenant's inference. Held, a refused request
        costs an idle coroutine; a client that honours Retry-After loses nothing. The hold
        is spread over +-50%, so that refused clients do not all come back at once: a burst
        of refusals to parse is a stall for everyone else's requests on the event loop."""
        spread = self.refusal_hold * random.uniform(0.5, 1.5)
        hold = min(spread, self._deadline() - time.monotonic())
        if hold > 0:
            await self.wait(hold)

    async def _embed(self, loaded: LoadedVersion, texts: Sequence[Any], tenant: str) -> Embeddings:
        encoder = loaded.encoder
        assert encoder is not None  # a text model's
        _check_count(loaded, len(texts), "input")
        limit = self.max_text_bytes
        size = 0
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidInput(
                    f"input[{index}] is {type(text).__name__}; texts must be strings",
                    extra={"param": "input"},
                )
            if not text.strip():
                raise InvalidInput(f"input[{index}] is empty", extra={"param": "input"})
            if len(text) > limit or len(text.encode()) > limit:
                raise InvalidInput(
                    f"input[{index}] is over {limit} bytes; send shorter texts",
                    extra={"param": "input"},
                )
            size += len(text)
        # Tokenizing is the costly part: not for a request its queue would refuse anyway.
        loaded.check(len(texts), tenant=tenant)
        try:
            if size <= INLINE_TOKENIZE_CHARS:
                ids = encoder.encode(texts)
            else:
                # Off the event loop: 100 long texts take milliseconds, which would stall
                # every other request (the tokenizer releases the GIL while it works).
                ids = await asyncio.to_thread(encoder.encode, texts)
        except TextTooLong as exc:
            raise InvalidInput(str(exc), extra={"param": "input"}) from None
        outputs = await loaded.embed(ids, tenant=tenant, deadline=self._deadline())
        return Embeddings(loaded, outputs[loaded.outputs[0].name], [len(one) for one in ids])


def _check_outputs(config: ModelConfig, requested: Sequence[str]) -> None:
    names = {o.name for o in config.outputs}
    for name in requested:
        if name not in names:
            raise InvalidInput(
                f"unknown output {name!r} (the model has: {', '.join(sorted(names))})"
            )


def _names_accounts(instances: Sequence[Any]) -> bool:
    return bool(instances) and all(isinstance(i, Mapping) and "account_id" in i for i in instances)


def _transactions(loaded: LoadedVersion, instances: Sequence[Any]) -> list[Transaction]:
    """Instances as transactions to score; the event id and time may be left out (the
    transaction is being scored now, not recorded)."""
    _check_count(loaded, len(instances), "instances")
    now = time.time()
    transactions: list[Transaction] = []
    for index, instance in enumerate(instances):
        try:
            transactions.append(
                Transaction.from_dict({"event_id": "scoring", "timestamp": now, **instance})
            )
        except InvalidTransaction as exc:
            problems = "; ".join(
                f"instances[{index}].{field}: {message}" for field, message in exc.errors.items()
            )
            raise InvalidInput(problems) from None
    return transactions


def _check_count(loaded: LoadedVersion, count: int, what: str) -> None:
    if count < 1:
        raise InvalidInput(f"no {what} items: send at least one", extra={"param": what})
    limit = loaded.config.max_items_per_request
    if count > limit:
        raise InvalidInput(
            f"{count} items in one request; {loaded.name} accepts at most {limit}",
            extra={"param": what},
        )


def _single_input(loaded: LoadedVersion) -> TensorSpec:
    if len(loaded.config.inputs) != 1:
        raise InvalidInput(
            f"{loaded.name} has {len(loaded.config.inputs)} inputs; use the Open Inference"
            " Protocol (/v2/models/.../infer) to send each one"
        )
    return loaded.config.inputs[0]


def _rows_from_instances(
    loaded: LoadedVersion, spec: TensorSpec, instances: Sequence[Any]
) -> Array:
    _check_count(loaded, len(instances), "instances")
    names = [f["name"] for f in loaded.metadata.feature_schema if "name" in f]
    width = spec.dims[0] if len(spec.dims) == 1 else None
    rows: list[list[Any]] = []
    for index, instance in enumerate(instances):
        if isinstance(instance, Mapping):
            if not names:
                raise InvalidInput(f"{loaded.name} takes instances as lists of values")
            missing = [n for n in names if n not in instance]
            unknown = sorted(set(instance) - set(names))
            if missing or unknown:
                raise InvalidInput(
                    f"instances[{index}]: "
                    + "; ".join(
                        part
                        for part in (
                            f"missing features {missing[:5]}" if missing else "",
                            f"unknown features {unknown[:5]}" if unknown else "",
                        )
                        if part
                    )
                )
            row = [instance[n] for n in names]
        elif isinstance(instance, list):
            row = instance
        else:
            raise InvalidInput(f"instances[{index}] must be a list of values or an object")
        if width is not None and width != -1 and len(row) != width:
            raise InvalidInput(
                f"instances[{index}] has {len(row)} values; {loaded.name} takes {width}"
            )
        for position, value in enumerate(row):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidInput(f"instances[{index}][{position}] is not a number")
        rows.append(row)
    try:
        return np.asarray(rows, dtype=DATATYPES[spec.datatype])
    except (ValueError, OverflowError):
        raise InvalidInput("instances must all have the same number of values") from None


def _check_tensors(loaded: LoadedVersion, tensors: Sequence[Tensor]) -> dict[str, Array]:
    specs = {spec.name: spec for spec in loaded.config.inputs}
    given = {t.name: t for t in tensors}
    if len(given) != len(tensors):
        raise InvalidInput("an input is named twice")
    unknown = sorted(set(given) - set(specs))
    if unknown:
        raise InvalidInput(f"{loaded.name} has no input {unknown[0]!r}; inputs: {sorted(specs)}")
    missing = sorted(set(specs) - set(given))
    if missing:
        raise InvalidInput(f"missing input {missing[0]!r}")
    arrays: dict[str, Array] = {}
    rows: int | None = None
    for name, spec in specs.items():
        tensor = given[name]
        if tensor.datatype != spec.datatype:
            raise InvalidInput(f"input {name!r} must be {spec.datatype}, not {tensor.datatype}")
        shape = tensor.shape
        if len(shape) != len(spec.dims) + 1 or any(
            d != -1 and d != s for d, s in zip(spec.dims, shape[1:], strict=False)
        ):
            expected = ", ".join(["n", *("*" if d == -1 else str(d) for d in spec.dims)])
            raise InvalidInput(f"input {name!r} has shape {list(shape)}; expected [{expected}]")
        if rows is None:
            rows = shape[0]
            _check_count(loaded, rows, "inputs")
        elif shape[0] != rows:
            raise InvalidInput("inputs disagree on the batch size (their first dimension)")
        data = tensor.data
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            bad = np.argwhere(~np.isfinite(data))[0].tolist()
            raise InvalidInput(f"input {name!r} holds NaN or infinity (first at {bad})")
        arrays[name] = np.ascontiguousarray(data.reshape(shape))
    return arrays


def _texts_from_tensor(loaded: LoadedVersion, tensors: Sequence[Tensor]) -> list[str]:
    spec = loaded.config.inputs[0]
    if len(tensors) != 1 or tensors[0].name != spec.name:
        raise InvalidInput(f"{loaded.name} takes exactly one input, {spec.name!r}")
    tensor = tensors[0]
    if tensor.datatype != "BYTES":
        raise InvalidInput(f"input {spec.name!r} must be BYTES, not {tensor.datatype}")
    shape = tensor.shape
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise InvalidInput(f"input {spec.name!r} has shape {list(shape)}; expected [n] or [n, 1]")
    texts: list[str] = []
    for index, value in enumerate(tensor.data.reshape(-1)):
        raw = value if isinstance(value, bytes) else str(value).encode()
        try:
            texts.append(raw.decode())
        except UnicodeDecodeError:
            raise InvalidInput(f"input {spec.name!r}[{index}] is not UTF-8 text") from None
    return texts
