"""No train/serve skew: simulated events through the HTTP path read as the training replay does."""

from __future__ import annotations

import random

import numpy as np
import pytest

from narthex.transactions import (
    FEATURES,
    AccountState,
    LabeledTransaction,
    Transaction,
    model_input,
    simulate,
    training_set,
)
from narthex.transactions.simulator import START
from tests.features.support import BACKENDS, serving

DAY = 86_400.0
# Instants between events (simulated timestamps are whole milliseconds), each after a
# further share of the events has arrived.
CUTS = (START + 1.5 * DAY + 0.0005, START + 3 * DAY + 7200.0005, START + 5 * DAY)
BATCH = 200


def probe(account: str, at: float) -> LabeledTransaction:
    """A transaction at `at` whose training row is made of the account's aggregates then."""
    tx = Transaction(
        event_id=f"probe-{account}-{at}",
        account_id=account,
        merchant_id="probe",
        amount=25.0,
        currency="USD",
        timestamp=at,
    )
    return LabeledTransaction(tx, is_fraud=False)


def offline_features(events: list[LabeledTransaction], at: float) -> dict[str, dict[str, float]]:
    """Each account's aggregates at `at`: its events replayed in time order."""
    states: dict[str, AccountState] = {}
    for event in sorted(events, key=lambda e: e.transaction.timestamp):
        tx = event.transaction
        states.setdefault(tx.account_id, AccountState()).apply(tx)
    return {account: state.features(at) for account, state in states.items()}


@pytest.mark.parametrize("backend", BACKENDS)
async def test_online_aggregates_equal_the_training_replay(backend: str) -> None:
    events = simulate(seed=21, accounts=20, days=5)
    # Every simulated account, those without a transaction included (unknown: defaults).
    accounts = [f"acct{n:05d}" for n in range(20)]
    assert {e.transaction.account_id for e in events} <= set(accounts)
    rng = random.Random(21)
    arrived: list[LabeledTransaction] = []

    async with serving(backend) as served:
        for cut in CUTS:
            # What has happened by `cut` and not been sent yet, in shuffled batches; one
            # batch goes twice (a producer's retry).
            sent = {e.transaction.event_id for e in arrived}
            fresh = [
                e
                for e in events
                if e.transaction.timestamp <= cut and e.transaction.event_id not in sent
            ]
            rng.shuffle(fresh)
            batches = [fresh[i : i + BATCH] for i in range(0, len(fresh), BATCH)]
            accepted = duplicates = 0
            for batch in [*batches, batches[0]]:
                payload = [e.transaction.to_dict() for e in batch]
                response = await served.ingest(payload)
                assert response.status_code == 200, response.text
                counts = response.json()
                accepted += counts["accepted"]
                duplicates += counts["duplicates"]
                assert counts["stale"] == 0
            assert (accepted, duplicates) == (len(fresh), len(batches[0]))
            arrived += fresh

            response = await served.batch_get(accounts, at=cut)
            assert response.status_code == 200, response.text
            online = {item["account"]: item for item in response.json()["features"]}

            # The aggregates, name by name, against a replay in time order.
            offline = offline_features(arrived, cut)
            for account in accounts:
                item = online[account]
                assert item["known"] is (account in offline)
                if account not in offline:
                    continue
                newest = max(
                    e.transaction.timestamp for e in arrived if e.transaction.account_id == account
                )
                assert item["age_seconds"] == pytest.approx(cut - newest, abs=1e-6)
                for name in FEATURES:
                    assert item["values"][name] == pytest.approx(
                        offline[account][name], rel=1e-6, abs=1e-6
                    ), (account, name)

            # The model's input rows: `training_set` (the code that trained the model) for a
            # probe transaction at `cut`, against `model_input` on the online aggregates.
            probes = [probe(account, cut) for account in accounts]
            rows = training_set([*arrived, *probes]).inputs[-len(probes) :]
            served_rows = np.asarray(
                [model_input(p.transaction, online[p.transaction.account_id]["values"])
                 for p in probes],
                dtype=np.float32,
            )  # fmt: skip
            np.testing.assert_allclose(served_rows, rows, rtol=1e-6, atol=1e-6)
        assert len(arrived) == len(events)  # the last cut is the end of the simulation
