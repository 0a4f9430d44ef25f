"""The fraud model's input vector: a transaction's own fields next to its account's aggregates.

`model_input` is the one function that turns (transaction, aggregates) into the model's
row, for the training set offline and for the inference service online (with aggregates
from the features service), so the two cannot drift apart. The aggregates are those at the
transaction's instant before the transaction itself is applied.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from narthex.transactions.aggregates import FEATURES, amount_zscore
from narthex.transactions.events import Channel, Transaction

__all__ = ["MODEL_FEATURES", "MODEL_FEATURE_NAMES", "ModelFeature", "model_input"]


@dataclass(frozen=True, slots=True)
class ModelFeature:
    name: str
    description: str


MODEL_FEATURES: tuple[ModelFeature, ...] = (
    ModelFeature("log_amount_usd", "ln(1 + amount in USD)"),
    ModelFeature("hour_cos", "cos(2 pi h / 24), h: the transaction's UTC time of day in hours"),
    ModelFeature("hour_sin", "sin(2 pi h / 24), as hour_cos"),
    *(
        ModelFeature(f"channel_{c.value}", f"1 if the channel is {c.value}, else 0")
        for c in Channel
    ),
    ModelFeature("has_history", "1 if the account has transactions in the 7 d window, else 0"),
    ModelFeature(
        "amount_zscore_7d",
        "amount vs the 7 d window's amounts, in standard deviations (floored at 1 USD,"
        " clipped to +-20; 0 without history)",
    ),
    ModelFeature(
        "log_amount_ratio_mean_7d",
        "ln((1 + amount) / (1 + 7 d mean amount)), USD (0 without history)",
    ),
    ModelFeature(
        "hour_affinity_7d",
        "how typical the hour of day is for the account: the dot product of the hour's unit"
        " vector with the 7 d mean one (-1 .. 1; 0 without history)",
    ),
    ModelFeature(
        "currency_unused_7d",
        "1 if the account has 7 d history but none in this currency, else 0",
    ),
    ModelFeature("log_txn_count_1h", "ln(1 + transactions in the 1 h window)"),
    ModelFeature("log_txn_count_24h", "ln(1 + transactions in the 24 h window)"),
    ModelFeature("log_txn_count_7d", "ln(1 + transactions in the 7 d window)"),
    ModelFeature("log_amount_sum_24h", "ln(1 + sum of amounts in the 24 h window, USD)"),
    ModelFeature("log_amount_mean_7d", "ln(1 + mean amount in the 7 d window, USD)"),
    ModelFeature("distinct_merchants_24h", "distinct merchants in the 24 h window"),
    ModelFeature(
        "merchant_spread_24h",
        "distinct merchants / transactions in the 24 h window (0 if none)",
    ),
    ModelFeature("log_seconds_since_last", "ln(1 + seconds since the account's last transaction)"),
)
MODEL_FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in MODEL_FEATURES)


def model_input(tx: Transaction, aggregates: Mapping[str, float]) -> list[float]:
    """The model's input row for `tx`, in `MODEL_FEATURES` order.

    `aggregates`: `AccountState.features(tx.timestamp)` before `tx` is applied (or the
    features service's answer, `DEFAULTS` for an unknown account). Every name in
    `FEATURES` must be present: a missing one is a bug upstream, never silently defaulted.
    """
    missing = [name for name in FEATURES if name not in aggregates]
    if missing:
        raise KeyError(f"aggregates lack {', '.join(missing)}")
    amount = tx.amount_usd
    angle = 2 * math.pi * ((tx.timestamp % 86_400) / 3_600) / 24
    hour_cos, hour_sin = math.cos(angle), math.sin(angle)
    history = aggregates["txn_count_7d"] > 0
    count_24h = aggregates["txn_count_24h"]
    mean_7d = aggregates["amount_mean_7d"]
    currency_used = aggregates[f"currency_{tx.currency.lower()}_7d"] > 0
    return [
        math.log1p(amount),
        hour_cos,
        hour_sin,
        *(1.0 if tx.channel is c else 0.0 for c in Channel),
        1.0 if history else 0.0,
        amount_zscore(amount, aggregates),
        math.log((1 + amount) / (1 + mean_7d)) if history else 0.0,
        hour_cos * aggregates["hour_cos_7d"] + hour_sin * aggregates["hour_sin_7d"],
        1.0 if history and not currency_used else 0.0,
        math.log1p(aggregates["txn_count_1h"]),
        math.log1p(count_24h),
        math.log1p(aggregates["txn_count_7d"]),
        math.log1p(aggregates["amount_sum_24h"]),
        math.log1p(mean_7d),
        aggregates["distinct_merchants_24h"],
        aggregates["distinct_merchants_24h"] / count_24h if count_24h > 0 else 0.0,
        math.log1p(aggregates["seconds_since_last"]),
    ]
