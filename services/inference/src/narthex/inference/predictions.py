"""Prediction events: per computed batch, each tenant's score counts per bin, for drift.

Compact enough for full traffic: one event per (batch, tenant) holding ten counts, whatever
the batch's size, so analytics sees every prediction. Only versions whose metadata holds a
`score_baseline` emit them (drift needs the baseline), and the score is one column of one
output: `score_output` in the metadata (`{"name": ..., "index": ...}`), by default column 1
of `probabilities` (a classifier's positive class).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from narthex.common.events import EventBuffer

__all__ = ["SCORE_BINS", "ScoreEvents", "score_events"]

SCORE_BINS = 10
_DEFAULT_OUTPUT = {"name": "probabilities", "index": 1}


class ScoreEvents:
    def __init__(
        self, sink: EventBuffer, model: str, version: int, output: str, index: int
    ) -> None:
        self.sink = sink
        self.model = model
        self.version = str(version)
        self.output = output
        self.index = index

    def computed(self, tenants: Sequence[str], results: Sequence[Mapping[str, Any]]) -> None:
        """Called on the event loop with a batch's chunks' tenants and results."""
        by_tenant: dict[str, list[np.ndarray]] = {}
        for tenant, result in zip(tenants, results, strict=True):
            scores = np.asarray(result[self.output])
            column = scores[:, self.index] if scores.ndim == 2 else scores.reshape(-1)
            by_tenant.setdefault(tenant, []).append(column)
        now = time.time()
        for tenant, columns in by_tenant.items():
            scores = np.clip(np.concatenate(columns), 0.0, 1.0)
            counts, _ = np.histogram(scores, bins=SCORE_BINS, range=(0.0, 1.0))
            self.sink.emit(
                {
                    "id": uuid.uuid4().hex,
                    "t": now,
                    "model": self.model,
                    "version": self.version,
                    "tenant": tenant,
                    "counts": [int(c) for c in counts],
                },
                tenant=tenant,
            )


def score_events(
    sink: EventBuffer | None,
    model: str,
    version: int,
    metadata_extra: Mapping[str, Any] | None,
    outputs: Sequence[str],
) -> ScoreEvents | None:
    """The version's prediction events, or None (no sink, no baseline, no score output)."""
    extra = metadata_extra or {}
    if sink is None or "score_baseline" not in extra:
        return None
    chosen = extra.get("score_output", _DEFAULT_OUTPUT)
    if not isinstance(chosen, dict):
        return None
    name, index = chosen.get("name"), chosen.get("index", 0)
    if name not in outputs or not isinstance(index, int):
        return None
    return ScoreEvents(sink, model, version, str(name), index)
