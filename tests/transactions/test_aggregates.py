"""AccountState: bucketed windows at their edges, pruning, serialisation, out-of-order events."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from narthex.transactions import (
    DEFAULTS,
    DESCRIPTIONS,
    FEATURES,
    RETENTION_SECONDS,
    AccountState,
    Channel,
    Transaction,
    amount_zscore,
)
from narthex.transactions.aggregates import MERCHANTS_KEPT, SECONDS_SINCE_LAST_CAP

H = 3600.0
# 2025-01-01T00:00:00Z: a whole day, so a whole hour and minute.
T0 = 1_735_689_600.0
_ids = itertools.count()


def tx(
    t: float,
    amount: float = 10.0,
    *,
    merchant: str = "m1",
    currency: str = "USD",
) -> Transaction:
    return Transaction(
        event_id=f"e{next(_ids)}",
        account_id="acct1",
        merchant_id=merchant,
        amount=amount,
        currency=currency,
        timestamp=t,
        channel=Channel.POS,
    )


def state_of(*events: Transaction) -> AccountState:
    state = AccountState()
    for event in events:
        state.apply(event)
    return state


def test_declarations_are_complete_and_a_new_account_reads_the_defaults() -> None:
    assert tuple(DEFAULTS) == FEATURES
    assert tuple(DESCRIPTIONS) == FEATURES
    assert all(DESCRIPTIONS.values())
    assert AccountState().features(T0) == DEFAULTS
    assert tuple(AccountState().features(T0)) == FEATURES
    assert DEFAULTS["seconds_since_last"] == SECONDS_SINCE_LAST_CAP
    assert tuple(state_of(tx(T0)).features(T0)) == FEATURES


def test_one_hour_window_is_the_sixty_minutes_ending_with_the_minute_of_at() -> None:
    state = state_of(tx(T0 - 0.001), tx(T0))  # the last instant of one minute, then the next
    assert state.features(T0)["txn_count_1h"] == 2
    # The earlier minute leaves the window when `at` enters the 60th minute after it.
    assert state.features(T0 + 59 * 60 - 0.001)["txn_count_1h"] == 2
    assert state.features(T0 + 59 * 60)["txn_count_1h"] == 1
    assert state.features(T0 + 60 * 60 - 0.001)["txn_count_1h"] == 1
    assert state.features(T0 + 60 * 60)["txn_count_1h"] == 0
    # Both still in the day.
    assert state.features(T0 + 60 * 60)["txn_count_24h"] == 2


def test_day_and_week_windows_are_whole_hours() -> None:
    state = state_of(tx(T0 + 0.5 * H, 10.0), tx(T0 + 1.5 * H, 20.0))
    at = T0 + 24 * H - 0.001  # the last instant whose 24 h window holds the first hour
    assert state.features(at)["txn_count_24h"] == 2
    assert state.features(T0 + 24 * H)["txn_count_24h"] == 1
    assert state.features(T0 + 24 * H)["amount_sum_24h"] == 20.0
    assert state.features(T0 + 25 * H)["txn_count_24h"] == 0
    assert state.features(T0 + 25 * H)["txn_count_7d"] == 2
    assert state.features(T0 + 168 * H - 0.001)["txn_count_7d"] == 2
    assert state.features(T0 + 168 * H)["txn_count_7d"] == 1
    assert state.features(T0 + 169 * H)["txn_count_7d"] == 0


def test_amount_statistics_are_exact_in_usd() -> None:
    state = state_of(
        tx(T0, 10.0), tx(T0 + 60, 20.0), tx(T0 + 120, 30.0), tx(T0 + 180, 1000, currency="JPY")
    )
    f = state.features(T0 + 600)
    assert f["txn_count_24h"] == 4
    assert f["amount_sum_24h"] == 66.7
    assert f["amount_sum_7d"] == 66.7
    assert f["amount_mean_24h"] == pytest.approx(66.7 / 4)
    amounts = np.array([10.0, 20.0, 30.0, 6.7])
    assert f["amount_mean_7d"] == pytest.approx(amounts.mean())
    assert f["amount_std_7d"] == pytest.approx(amounts.std())


def test_distinct_merchants_seconds_since_last_and_currencies() -> None:
    state = state_of(
        tx(T0, merchant="a"),
        tx(T0 + 60, merchant="b"),
        tx(T0 + 2 * H, merchant="a", currency="EUR"),
    )
    f = state.features(T0 + 2 * H + 30)
    assert f["distinct_merchants_24h"] == 2
    assert f["seconds_since_last"] == 30
    assert (f["currency_usd_7d"], f["currency_eur_7d"], f["currency_gbp_7d"]) == (1, 1, 0)
    # Merchant b was last seen in the first hour, a in the third.
    assert state.features(T0 + 24 * H)["distinct_merchants_24h"] == 1
    assert state.features(T0 + 26 * H)["distinct_merchants_24h"] == 0
    assert state.features(T0 + 100 * H)["seconds_since_last"] == 98 * H
    assert state.features(T0 + 100 * H)["currency_eur_7d"] == 1
    assert state.features(T0 + 170 * H)["currency_eur_7d"] == 0
    assert state.features(T0 + 60 * 24 * H)["seconds_since_last"] == SECONDS_SINCE_LAST_CAP


def test_hour_profile_points_at_the_usual_hour() -> None:
    # Every day at 06:xx UTC.
    state = state_of(*(tx(T0 + d * 24 * H + 6 * H + 600) for d in range(5)))
    f = state.features(T0 + 5 * 24 * H)
    angle = 2 * math.pi * 6.5 / 24
    assert f["hour_cos_7d"] == pytest.approx(math.cos(angle))
    assert f["hour_sin_7d"] == pytest.approx(math.sin(angle))


def test_amount_zscore_uses_floor_and_clip() -> None:
    assert amount_zscore(500.0, DEFAULTS) == 0.0
    steady = state_of(*(tx(T0 + i * 60, 10.0) for i in range(5))).features(T0 + H)
    assert steady["amount_std_7d"] == 0.0
    assert amount_zscore(12.0, steady) == 2.0  # (12 - 10) / the 1 USD floor
    assert amount_zscore(10_000.0, steady) == 20.0
    varied = state_of(tx(T0, 10.0), tx(T0 + 60, 30.0)).features(T0 + H)
    assert amount_zscore(40.0, varied) == pytest.approx(2.0)


def test_a_quiet_account_reads_as_unknown_after_the_retention() -> None:
    state = state_of(tx(T0, 50.0, merchant="x", currency="CHF"), tx(T0 + 3 * H))
    assert state.features(T0 + 3 * H + RETENTION_SECONDS) == DEFAULTS
    assert state.features(T0 + 3 * H + RETENTION_SECONDS - 1) != DEFAULTS


def test_pruning_bounds_the_state_of_a_busy_account() -> None:
    state = AccountState()
    # 20 days of a transaction every 3 minutes, each at a new merchant.
    for i in range(20 * 24 * 20):
        state.apply(tx(T0 + i * 180, 5.0, merchant=f"m{i}"))
    data = state.to_dict()
    assert len(data["m"]) == 60 // 3
    assert len(data["h"]) == 168
    assert len(data["mer"]) == MERCHANTS_KEPT
    assert len(json.dumps(data)) < 12_000
    last = state.last_timestamp
    assert last == T0 + 20 * 24 * H - 180
    f = state.features(last)
    assert f["distinct_merchants_24h"] == MERCHANTS_KEPT
    assert f["txn_count_24h"] == 24 * 20
    assert f["txn_count_7d"] == 7 * 24 * 20


def test_to_dict_from_dict_round_trip_through_json() -> None:
    rng = np.random.default_rng(3)
    events = [
        tx(
            T0 + float(t),
            float(a),
            merchant=f"m{int(m)}",
            currency=str(rng.choice(["USD", "EUR", "JPY"])),
        )
        for t, a, m in zip(
            np.sort(rng.uniform(0, 10 * 24 * H, 300)),
            np.round(rng.lognormal(3, 1, 300), 2) + 0.01,
            rng.integers(0, 90, 300),
            strict=True,
        )
    ]
    state = state_of(*events[:250])
    copy = AccountState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert copy == state
    for at in (events[249].timestamp, T0 + 10 * 24 * H, T0 + 15 * 24 * H):
        assert copy.features(at) == state.features(at)
    # And they go on identically.
    for event in events[250:]:
        assert copy.apply(event) == state.apply(event)
    assert copy.to_dict() == state.to_dict()
    assert copy.features(T0 + 11 * 24 * H) == state.features(T0 + 11 * 24 * H)


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"v": 2, "last": None, "m": [], "h": [], "mer": [], "cur": []},
        {"v": 1, "last": "x", "m": [], "h": [], "mer": [], "cur": []},
        {"v": 1, "last": T0, "m": [[1.5, 1]], "h": [], "mer": [], "cur": []},
        {"v": 1, "last": T0, "m": [], "h": [[1, 1, 100.0]], "mer": [], "cur": []},
        {"v": 1, "last": T0, "m": [], "h": [], "mer": [], "cur": [["XXX", 1]]},
        {"v": 1, "last": None, "m": [[1, 1]], "h": [], "mer": [], "cur": []},
        {"v": 1, "last": T0, "m": [], "h": [], "mer": [[1, 1]], "cur": []},
    ],
)
def test_from_dict_refuses_what_to_dict_did_not_write(data: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="account state"):
        AccountState.from_dict(data)


def test_arrival_order_does_not_change_the_features() -> None:
    rng = np.random.default_rng(11)
    times = T0 + np.round(rng.uniform(0, 9 * 24 * H, 1500), 3)
    events = [
        tx(
            float(t),
            float(np.round(rng.lognormal(3, 1), 2) + 0.01),
            merchant=f"m{int(rng.integers(0, 80))}",
            currency=str(rng.choice(["USD", "GBP", "CAD"])),
        )
        for t in times
    ]
    in_order = state_of(*sorted(events, key=lambda e: e.timestamp))
    shuffled = [events[i] for i in rng.permutation(len(events))]
    as_arrived = state_of(*shuffled)
    newest = float(times.max())
    for at in (newest, newest + 1800, newest + 2 * 24 * H):
        assert as_arrived.features(at) == in_order.features(at)


def test_a_late_event_counts_in_the_windows_it_still_falls_in() -> None:
    head = T0 + 10 * 24 * H
    state = state_of(tx(head, 10.0, merchant="a"))
    assert state.apply(tx(head - 2 * H, 30.0, merchant="b"))  # 2 h late
    f = state.features(head)
    assert (f["txn_count_1h"], f["txn_count_24h"], f["txn_count_7d"]) == (1, 2, 2)
    assert f["distinct_merchants_24h"] == 2
    assert f["amount_sum_24h"] == 40.0
    # seconds_since_last measures from the newest event.
    assert f["seconds_since_last"] == 0
    assert state.last_timestamp == head

    assert state.apply(tx(head - 3 * 24 * H, 5.0, merchant="c", currency="EUR"))  # 3 d late
    f = state.features(head)
    assert (f["txn_count_24h"], f["txn_count_7d"], f["amount_sum_7d"]) == (2, 3, 45.4)
    assert f["distinct_merchants_24h"] == 2
    assert f["currency_eur_7d"] == 1

    before = state.to_dict()
    assert not state.apply(tx(head - 8 * 24 * H, 99.0, merchant="d"))  # older than any window
    assert state.to_dict() == before


def test_features_before_the_head_leave_out_later_buckets() -> None:
    state = state_of(tx(T0), tx(T0 + 3 * H))
    f = state.features(T0 + H)
    assert (f["txn_count_1h"], f["txn_count_24h"]) == (0, 1)
    assert f["seconds_since_last"] == 0  # the head is after `at`: no negative ages
