"""The fraud model's training set: labelled transactions replayed through `AccountState`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from narthex.transactions.aggregates import AccountState
from narthex.transactions.model_inputs import MODEL_FEATURES, model_input
from narthex.transactions.simulator import LabeledTransaction

__all__ = ["TrainingSet", "training_set"]


@dataclass(frozen=True, slots=True)
class TrainingSet:
    """Rows in timestamp order."""

    inputs: np.ndarray  # float32 [n, len(MODEL_FEATURES)]
    labels: np.ndarray  # int64 [n], 1 = fraud
    timestamps: np.ndarray  # float64 [n]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def fraud_rate(self) -> float:
        return float(self.labels.mean()) if len(self) else 0.0

    def split(self, holdout: float = 0.25) -> tuple[TrainingSet, TrainingSet]:
        """(train, holdout): the holdout is the latest `holdout` share of the rows.

        By time, not at random: a model is used on transactions after those it learnt
        from, and rows of one account close in time are not independent.
        """
        if not 0 < holdout < 1:
            raise ValueError("holdout must be between 0 and 1")
        cut = round(len(self) * (1 - holdout))
        return self[:cut], self[cut:]

    def __getitem__(self, rows: slice) -> TrainingSet:
        return TrainingSet(self.inputs[rows], self.labels[rows], self.timestamps[rows])


def training_set(events: Iterable[LabeledTransaction]) -> TrainingSet:
    """Each transaction's `model_input` with its account's aggregates at its own instant,
    before it is applied, exactly as the features service would have answered then.

    Events are replayed in timestamp order (stable: ties keep the given order).
    """
    ordered = sorted(events, key=lambda e: e.transaction.timestamp)
    states: dict[str, AccountState] = {}
    rows: list[list[float]] = []
    for event in ordered:
        tx = event.transaction
        state = states.get(tx.account_id)
        if state is None:
            state = states[tx.account_id] = AccountState()
        rows.append(model_input(tx, state.features(tx.timestamp)))
        state.apply(tx)
    width = len(MODEL_FEATURES)
    return TrainingSet(
        inputs=np.asarray(rows, dtype=np.float32).reshape(len(rows), width),
        labels=np.fromiter((e.is_fraud for e in ordered), dtype=np.int64, count=len(ordered)),
        timestamps=np.fromiter(
            (e.transaction.timestamp for e in ordered), dtype=np.float64, count=len(ordered)
        ),
    )
