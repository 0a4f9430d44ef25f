"""The kinds of model a version can be (tensor, text, transaction): each one's batch work.

A kind is what a version's batcher runs (`narthex.inference.batcher.Kind`): `prepare` on the
event loop once a batch is formed, then `compute` in the batcher's thread. Only the
transaction kind prepares anything: one feature lookup for every account in the batch, so
that a batch of many requests costs one batchGet call, not one per request.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from narthex.inference.features import FeatureClient, Lookup
from narthex.inference.repository import ModelConfig
from narthex.inference.runtime import Session
from narthex.inference.text import TextEncoder
from narthex.transactions import Transaction, model_input

__all__ = [
    "DEGRADED",
    "Array",
    "Feeds",
    "ModelKind",
    "Outputs",
    "Scoring",
    "TensorKind",
    "TextKind",
    "TransactionKind",
    "kind_for",
]

Array = np.ndarray[Any, Any]
Feeds = Mapping[str, Array]  # rows of a model's named inputs
Outputs = dict[str, Array]
# The extra output of a scored transaction: its aggregates were the defaults.
DEGRADED = "degraded"


class TensorKind:
    """Rows of named tensors as given: the batch's rows in one run, split back per chunk."""

    def __init__(self, session: Session, outputs: Sequence[str]) -> None:
        self.session = session
        self.outputs = list(outputs)

    async def prepare(self, payloads: list[Feeds]) -> None:
        """Nothing to do: the rows are complete."""

    def compute(self, payloads: list[Feeds]) -> list[Outputs]:
        names = self.outputs
        if len(payloads) == 1:
            outputs = self.session.run(payloads[0])
            return [{name: outputs[name] for name in names}]
        feeds = {name: np.concatenate([p[name] for p in payloads]) for name in payloads[0]}
        outputs = self.session.run(feeds)
        offsets = np.cumsum([len(next(iter(p.values()))) for p in payloads])[:-1]
        split = {name: np.split(outputs[name], offsets) for name in names}
        return [{name: split[name][i] for name in names} for i in range(len(payloads))]


class TextKind:
    """Token ids, one text per chunk: a batch is padded to its longest text."""

    def __init__(self, session: Session, encoder: TextEncoder, outputs: Sequence[str]) -> None:
        self.session = session
        self.encoder = encoder
        self.outputs = list(outputs)

    async def prepare(self, payloads: list[list[int]]) -> None:
        """Nothing to do: texts are tokenized before they are queued."""

    def compute(self, payloads: list[list[int]]) -> list[Outputs]:
        outputs = self.session.run(self.encoder.collate(payloads))
        return [
            {name: outputs[name][i : i + 1] for name in self.outputs} for i in range(len(payloads))
        ]


@dataclass(eq=False, slots=True)
class Scoring:
    """A chunk of transactions to score: its rows are made in `TransactionKind.prepare`,
    from aggregates looked up for the whole batch."""

    transactions: list[Transaction]
    tenant: str  # whose accounts these are: each is looked up under it
    rows: Array | None = None
    degraded: bool = False


class TransactionKind:
    """Transactions whose accounts' aggregates are looked up when their batch forms, or
    rows given inline (a `Feeds` chunk, as a tensor model takes them), in one run."""

    def __init__(
        self,
        session: Session,
        input_name: str,
        outputs: Sequence[str],
        features: FeatureClient | None,
    ) -> None:
        self.input_name = input_name
        self.features = features
        self._tensors = TensorKind(session, outputs)

    async def prepare(self, payloads: list[Scoring | Feeds]) -> None:
        """One feature lookup for every account in the batch, each under its chunk's tenant
        (a batch may mix tenants), then each chunk's rows."""
        scoring = [p for p in payloads if isinstance(p, Scoring)]
        if not scoring:
            return
        entities = [(p.tenant, tx.account_id) for p in scoring for tx in p.transactions]
        if self.features is None:
            lookup = Lookup.defaults(len(entities), "none")
        else:
            lookup = await self.features.lookup(entities, at=time.time())
        values = iter(lookup.values)
        for payload in scoring:
            payload.rows = np.asarray(
                [model_input(tx, next(values)) for tx in payload.transactions],
                dtype=np.float32,
            )
            payload.degraded = lookup.degraded

    def compute(self, payloads: list[Scoring | Feeds]) -> list[Outputs]:
        name = self.input_name
        feeds: list[Feeds] = []
        for payload in payloads:
            rows = payload.rows if isinstance(payload, Scoring) else payload[name]
            assert rows is not None  # made by `prepare` before compute
            feeds.append({name: rows})
        results = self._tensors.compute(feeds)
        for payload, result in zip(payloads, results, strict=True):
            if isinstance(payload, Scoring):
                count = len(payload.transactions)
                result[DEGRADED] = np.full(count, payload.degraded, dtype=np.bool_)
        return results


ModelKind = TensorKind | TextKind | TransactionKind


def kind_for(
    config: ModelConfig, session: Session, directory: Path, features: FeatureClient | None
) -> ModelKind:
    """The kind `config.preprocessing` names, over an open session of the version in
    `directory` (a text model's tokenizer is read from there)."""
    outputs = [o.name for o in config.outputs]
    preprocessing = config.preprocessing
    match preprocessing.kind:
        case "text":
            encoder = TextEncoder(
                directory / preprocessing.tokenizer,
                max_tokens=preprocessing.max_tokens,
                truncate=preprocessing.truncate,
                graph_inputs=list(session.inputs),
            )
            return TextKind(session, encoder, outputs)
        case "transaction":
            return TransactionKind(session, config.inputs[0].name, outputs, features)
        case "none":
            return TensorKind(session, outputs)
