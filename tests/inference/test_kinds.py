"""Model kinds: which one a config names, and each one's batch work on a real session."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from narthex.inference.kinds import (
    DEGRADED,
    Scoring,
    TensorKind,
    TextKind,
    TransactionKind,
    kind_for,
)
from narthex.inference.repository import MODEL_FILE, Repository
from narthex.inference.runtime import Session
from narthex.transactions import DEFAULTS, MODEL_FEATURES, Transaction, model_input
from tests.support.onnx_models import scorer_repository, tiny_repository

TX = {
    "event_id": "scoring",
    "merchant_id": "m_9",
    "amount": 42.5,
    "currency": "EUR",
    "timestamp": 1_790_000_000.0,
}


def _kind(root: Path, name: str) -> TensorKind | TextKind | TransactionKind:
    repository = Repository(root)
    directory = repository.version_dir(name, 1)
    session = Session(directory / MODEL_FILE, provider="cpu")
    return kind_for(repository.config(name), session, directory, None)


def test_the_config_s_preprocessing_names_the_kind(tmp_path: Path) -> None:
    tiny_repository(tmp_path / "tiny")
    scorer_repository(tmp_path / "scorer")
    assert isinstance(_kind(tmp_path / "tiny", "affine"), TensorKind)
    assert isinstance(_kind(tmp_path / "tiny", "words"), TextKind)
    assert isinstance(_kind(tmp_path / "scorer", "scorer"), TransactionKind)


async def test_a_tensor_batch_is_one_run_split_back_per_chunk(tmp_path: Path) -> None:
    kind = _kind(tiny_repository(tmp_path), "affine")
    assert isinstance(kind, TensorKind)
    one = {"x": np.ones((1, 3), np.float32)}
    two = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    await kind.prepare([one, two])
    together = kind.compute([one, two])
    alone = [kind.compute([one])[0], kind.compute([two])[0]]
    for got, want in zip(together, alone, strict=True):
        assert got.keys() == want.keys() == {"y", "total"}
        np.testing.assert_array_equal(got["y"], want["y"])
    np.testing.assert_array_equal(together[1]["total"], [9.0, 27.0])  # x*2+1, summed


async def test_transactions_are_looked_up_in_prepare_and_inline_rows_pass_through(
    tmp_path: Path,
) -> None:
    kind = _kind(scorer_repository(tmp_path), "scorer")
    assert isinstance(kind, TransactionKind)  # with no feature client: the defaults
    transactions = [
        Transaction.from_dict({**TX, "account_id": account}) for account in ("a1", "a2")
    ]
    scoring = Scoring(transactions, tenant="t_acme")
    inline = {"features": np.ones((1, len(MODEL_FEATURES)), np.float32)}
    await kind.prepare([scoring, inline])
    assert scoring.degraded
    scored, given = kind.compute([scoring, inline])
    want = [
        np.float32(sum(np.float32(v) for v in model_input(tx, DEFAULTS))) for tx in transactions
    ]
    np.testing.assert_allclose(scored["score"], want, rtol=1e-6)
    assert scored[DEGRADED].tolist() == [True, True]
    np.testing.assert_array_equal(given["score"], [len(MODEL_FEATURES)])
    assert DEGRADED not in given  # rows given inline were never looked up
