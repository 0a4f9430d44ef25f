"""The training set: a replay through AccountState, the same as the features service online."""

from __future__ import annotations

import json

import numpy as np
import pytest

from narthex.transactions import (
    MODEL_FEATURES,
    AccountState,
    LabeledTransaction,
    model_input,
    simulate,
    training_set,
)


@pytest.fixture(scope="module")
def events() -> list[LabeledTransaction]:
    return simulate(seed=5, accounts=80, days=12)


def test_shapes_types_and_labels(events: list[LabeledTransaction]) -> None:
    data = training_set(events)
    assert data.inputs.shape == (len(events), len(MODEL_FEATURES))
    assert data.inputs.dtype == np.float32
    assert data.labels.dtype == np.int64
    assert data.labels.tolist() == [int(e.is_fraud) for e in events]
    assert np.isfinite(data.inputs).all()


def test_rows_match_an_online_replay_through_stored_state(
    events: list[LabeledTransaction],
) -> None:
    # What the features service does: load the account's JSON state, read the aggregates
    # for the transaction, apply it, store the state again; events arriving in any order.
    rng = np.random.default_rng(0)
    arrival = [events[i] for i in rng.permutation(len(events))]
    store: dict[str, str] = {}
    rows: dict[str, list[float]] = {}
    for event in sorted(arrival, key=lambda e: e.transaction.timestamp):
        tx = event.transaction
        raw = store.get(tx.account_id)
        state = AccountState.from_dict(json.loads(raw)) if raw else AccountState()
        rows[tx.event_id] = model_input(tx, state.features(tx.timestamp))
        state.apply(tx)
        store[tx.account_id] = json.dumps(state.to_dict())
    offline = training_set(arrival)
    online = np.asarray([rows[e.transaction.event_id] for e in events], dtype=np.float32)
    assert np.array_equal(offline.inputs, online)


def test_split_is_by_time(events: list[LabeledTransaction]) -> None:
    data = training_set(events)
    train, holdout = data.split(0.25)
    assert len(train) + len(holdout) == len(data)
    assert len(holdout) == pytest.approx(0.25 * len(data), abs=1)
    assert train.timestamps.max() <= holdout.timestamps.min()
    assert np.array_equal(np.concatenate([train.inputs, holdout.inputs]), data.inputs)
    with pytest.raises(ValueError, match="between 0 and 1"):
        data.split(1.0)
