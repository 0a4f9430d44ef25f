"""The fraud model's input row: own fields, aggregates before the transaction, comparisons."""

from __future__ import annotations

import math

import pytest

from narthex.transactions import (
    DEFAULTS,
    MODEL_FEATURE_NAMES,
    MODEL_FEATURES,
    AccountState,
    Channel,
    Transaction,
    model_input,
)

T0 = 1_735_689_600.0
H = 3600.0


def tx(
    t: float, amount: float = 10.0, *, currency: str = "USD", channel: Channel = Channel.POS
) -> Transaction:
    return Transaction(
        event_id=f"e{t}",
        account_id="acct1",
        merchant_id="m1",
        amount=amount,
        currency=currency,
        timestamp=t,
        channel=channel,
    )


def named(row: list[float]) -> dict[str, float]:
    assert len(row) == len(MODEL_FEATURES)
    return dict(zip(MODEL_FEATURE_NAMES, row, strict=True))


def test_schema_names_are_unique_and_described() -> None:
    assert len(set(MODEL_FEATURE_NAMES)) == len(MODEL_FEATURE_NAMES)
    assert all(f.description for f in MODEL_FEATURES)


def test_unknown_account_row() -> None:
    row = named(model_input(tx(T0 + 18 * H, 99.0, channel=Channel.ONLINE), DEFAULTS))
    assert row["log_amount_usd"] == pytest.approx(math.log(100.0))
    assert (row["hour_cos"], row["hour_sin"]) == pytest.approx((0.0, -1.0))
    assert (row["channel_pos"], row["channel_online"], row["channel_atm"]) == (0, 1, 0)
    assert row["has_history"] == 0
    assert row["amount_zscore_7d"] == 0
    assert row["log_amount_ratio_mean_7d"] == 0
    assert row["hour_affinity_7d"] == 0
    assert row["currency_unused_7d"] == 0
    assert row["log_seconds_since_last"] == pytest.approx(math.log1p(30 * 24 * H))


def test_row_compares_the_transaction_with_the_account_history() -> None:
    state = AccountState()
    for day in range(5):  # a 10 USD payment every morning at 08:xx
        state.apply(tx(T0 + day * 24 * H + 8 * H + 60, 10.0))
    at = T0 + 5 * 24 * H + 20 * H  # 20:00 the next day, in euros, 50 USD
    row = named(model_input(tx(at, 50 / 1.08, currency="EUR"), state.features(at)))
    assert row["has_history"] == 1
    assert row["amount_zscore_7d"] == pytest.approx(20.0)  # (50 - 10) / 1, clipped
    assert row["log_amount_ratio_mean_7d"] == pytest.approx(math.log(51 / 11))
    assert row["hour_affinity_7d"] == pytest.approx(math.cos(2 * math.pi * 11.5 / 24))
    assert row["currency_unused_7d"] == 1
    assert row["log_txn_count_7d"] == pytest.approx(math.log(6))
    assert row["log_seconds_since_last"] == pytest.approx(math.log1p(36 * H - 60))

    usual = named(model_input(tx(at, 10.0), state.features(at)))
    assert usual["amount_zscore_7d"] == 0
    assert usual["currency_unused_7d"] == 0


def test_missing_aggregates_are_an_error_not_a_default() -> None:
    aggregates = dict(DEFAULTS)
    del aggregates["txn_count_1h"]
    with pytest.raises(KeyError, match="txn_count_1h"):
        model_input(tx(T0), aggregates)
