"""The transaction simulator: deterministic, sorted, valid, with a learnable share of fraud."""

from __future__ import annotations

import numpy as np
import pytest

from narthex.transactions import simulate
from narthex.transactions.simulator import START


def test_same_seed_same_events_other_seed_other_events() -> None:
    first = simulate(seed=1, accounts=40, days=8)
    assert simulate(seed=1, accounts=40, days=8) == first
    other = simulate(seed=2, accounts=40, days=8)
    assert [e.transaction.timestamp for e in other] != [e.transaction.timestamp for e in first]
    assert {e.transaction.event_id for e in other}.isdisjoint(e.transaction.event_id for e in first)


def test_events_are_sorted_unique_and_inside_the_period() -> None:
    events = simulate(seed=3, accounts=60, days=10)
    times = [e.transaction.timestamp for e in events]
    assert times == sorted(times)
    assert times[0] >= START
    assert times[-1] < START + 10 * 86_400
    assert len({e.transaction.event_id for e in events}) == len(events)
    assert len({e.transaction.account_id for e in events}) == 60


def test_fraud_share_and_its_signals() -> None:
    events = simulate(seed=4, accounts=250, days=21)
    fraud = np.array([e.is_fraud for e in events])
    assert 0.01 <= fraud.mean() <= 0.03
    usd = np.array([e.transaction.amount_usd for e in events])
    assert np.median(usd[fraud]) > 1.5 * np.median(usd[~fraud])
    online = np.array([e.transaction.channel == "online" for e in events])
    assert online[fraud].mean() > online[~fraud].mean()
    # Not trivially separable: legitimate activity has big amounts and other currencies too.
    assert (usd[~fraud] > np.median(usd[fraud])).sum() > fraud.sum()
    assert len({e.transaction.currency for e in events}) == 6


@pytest.mark.parametrize("kwargs", [{"accounts": 0}, {"days": 0}, {"merchants": 5}])
def test_refuses_an_empty_simulation(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="at least"):
        simulate(**kwargs)
