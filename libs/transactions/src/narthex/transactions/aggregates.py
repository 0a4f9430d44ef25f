"""Per-account rolling aggregates: one definition for model training and the features service.

An `AccountState` is updated once per transaction (`apply`, O(1): a few dictionary
updates, plus pruning bounded by the state's fixed size) and read at any instant
(`features(at)`). The windows are made of whole UTC buckets:

- the 1 h window is the 60 one-minute buckets ending with the minute that holds `at`,
  i.e. timestamps in [floor(at / 60) * 60 - 59 min, floor(at / 60) * 60 + 1 min);
- the 24 h and 7 d windows are the 24 and 168 one-hour buckets ending with the hour
  that holds `at`.

So a window reaches back between its length minus one bucket and its length; that is
the price of a state that does not keep every transaction.

Amounts are accumulated in USD whole cents (`Transaction.amount_usd`), in floats that
hold integers exactly (below 2**53 cents), and the hour-of-day profile in integer
counts: the features at an instant at or after every applied event are therefore exactly
the same whatever order the events were applied in. That is what lets the features
service, which sees events as they arrive, match the training set, which replays them
sorted.

Out-of-order events (older than the newest one applied, which is the state's "head"):
- an event still inside a bucket that the state keeps (the last 60 minutes, 168 hours
  and, for merchants, 24 hours before the head) counts in those windows exactly as if
  it had arrived in order;
- the part of it older than what a granularity keeps is dropped: an event 2 h behind the
  head counts in the 24 h and 7 d windows but not in the 1 h one; one more than 7 d
  behind counts nowhere and changes nothing. Such a part could not be in any window at
  an instant at or after the head anyway.
- `seconds_since_last` measures from the newest event, so a late event does not move it.

Events in the future move the head forward and prune what is older than it; the features
service refuses timestamps too far ahead before they get here. Duplicates are not
detected here either: the features service deduplicates by event id before `apply`.

`features(at)` is meant for `at` at or after the head (that is how both the training
replay and the features service read it). For an earlier `at`, buckets after `at` are
left out, but what was pruned relative to the head is gone.

A state untouched for `RETENTION_SECONDS` reads exactly as `DEFAULTS` (what an unknown
account gets), so the features service may expire it after that long without changing
any answer.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from narthex.transactions.events import USD_RATES, Transaction

__all__ = [
    "DEFAULTS",
    "DESCRIPTIONS",
    "FEATURES",
    "MERCHANTS_KEPT",
    "RETENTION_SECONDS",
    "SECONDS_SINCE_LAST_CAP",
    "STATE_FORMAT",
    "AccountState",
    "Feature",
    "amount_zscore",
]

MINUTE = 60
HOUR = 3600
DAY = 86_400

_MINUTES_KEPT = 60  # the 1 h window
_HOURS_KEPT = 7 * 24  # the 7 d window (the 24 h one is its newest part)
_HOURS_24 = 24
# Distinct merchants are counted up to this many: it bounds the state an account under a
# card-testing attack (hundreds of merchants an hour) can grow to.
MERCHANTS_KEPT = 64
SECONDS_SINCE_LAST_CAP = 30.0 * DAY
RETENTION_SECONDS = SECONDS_SINCE_LAST_CAP
# Below this standard deviation (USD), an account's amounts count as constant: the
# z-score would otherwise explode on a few cents of difference.
_STD_FLOOR_USD = 1.0
_ZSCORE_CLIP = 20.0
STATE_FORMAT = 1

# Unit vectors of each UTC hour of day (at its middle), for the circular mean of when an
# account is active.
_HOUR_COS = tuple(math.cos(2 * math.pi * (h + 0.5) / 24) for h in range(24))
_HOUR_SIN = tuple(math.sin(2 * math.pi * (h + 0.5) / 24) for h in range(24))


@dataclass(frozen=True, slots=True)
class Feature:
    name: str
    description: str
    # The value for an account with no transactions (declared here, nowhere else).
    default: float


_CURRENCY_FEATURES = tuple(
    Feature(
        f"currency_{code.lower()}_7d",
        f"1 if the account used {code} in the 7 d window, else 0",
        0.0,
    )
    for code in USD_RATES
)

_DECLARED: tuple[Feature, ...] = (
    Feature("txn_count_1h", "transactions in the 1 h window", 0.0),
    Feature("txn_count_24h", "transactions in the 24 h window", 0.0),
    Feature("txn_count_7d", "transactions in the 7 d window", 0.0),
    Feature("amount_sum_24h", "sum of amounts in the 24 h window, USD", 0.0),
    Feature("amount_mean_24h", "mean amount in the 24 h window, USD (0 if none)", 0.0),
    Feature("amount_sum_7d", "sum of amounts in the 7 d window, USD", 0.0),
    Feature("amount_mean_7d", "mean amount in the 7 d window, USD (0 if none)", 0.0),
    Feature(
        "amount_std_7d",
        "population standard deviation of amounts in the 7 d window, USD (0 if none)",
        0.0,
    ),
    Feature(
        "distinct_merchants_24h",
        f"distinct merchants in the 24 h window (counted up to {MERCHANTS_KEPT})",
        0.0,
    ),
    Feature(
        "seconds_since_last",
        "seconds since the account's newest transaction"
        f" (at most {SECONDS_SINCE_LAST_CAP:.0f}, also when there is none)",
        SECONDS_SINCE_LAST_CAP,
    ),
    Feature(
        "hour_cos_7d",
        "mean of cos(2 pi h / 24) over the 7 d window's transactions, h: the middle of"
        " their UTC hour of day (with hour_sin_7d: when the account is usually active, and"
        " how consistently)",
        0.0,
    ),
    Feature("hour_sin_7d", "mean of sin(2 pi h / 24), as hour_cos_7d", 0.0),
    *_CURRENCY_FEATURES,
)

FEATURES: tuple[str, ...] = tuple(f.name for f in _DECLARED)
DESCRIPTIONS: dict[str, str] = {f.name: f.description for f in _DECLARED}
DEFAULTS: dict[str, float] = {f.name: f.default for f in _DECLARED}
_CURRENCY_FEATURE = {code: f.name for code, f in zip(USD_RATES, _CURRENCY_FEATURES, strict=True)}


def amount_zscore(amount_usd: float, aggregates: Mapping[str, float]) -> float:
    """How unusual `amount_usd` is against the account's 7 d amounts, in standard deviations.

    0 without history; the deviation is floored (1 USD) so that an account that always
    spends the same amount is not infinitely surprised, and the result is clipped to +-20.
    """
    if aggregates["txn_count_7d"] <= 0:
        return 0.0
    std = max(aggregates["amount_std_7d"], _STD_FLOOR_USD)
    z = (amount_usd - aggregates["amount_mean_7d"]) / std
    return min(max(z, -_ZSCORE_CLIP), _ZSCORE_CLIP)


class AccountState:
    """The rolling aggregates of one account; see the module docstring for the semantics."""

    __slots__ = ("_currencies", "_hours", "_last", "_merchants", "_minutes")

    def __init__(self) -> None:
        # The newest timestamp applied: the head that buckets are kept relative to.
        self._last: float | None = None
        self._minutes: dict[int, int] = {}  # minute index -> transactions
        # hour index -> [transactions, USD cents, USD cents squared]
        self._hours: dict[int, list[float]] = {}
        # Newest hour index each was used in. Insertion order breaks ties when evicting,
        # and is kept by to_dict/from_dict.
        self._merchants: dict[str, int] = {}
        self._currencies: dict[str, int] = {}

    def apply(self, tx: Transaction) -> bool:
        """Count `tx`; False when it is too old to count in any window (it changed nothing)."""
        t = tx.timestamp
        minute, hour = int(t // MINUTE), int(t // HOUR)
        if self._last is None or t > self._last:
            self._advance(t)
        assert self._last is not None
        head_minute, head_hour = int(self._last // MINUTE), int(self._last // HOUR)
        if hour <= head_hour - _HOURS_KEPT:
            return False

        if minute > head_minute - _MINUTES_KEPT:
            self._minutes[minute] = self._minutes.get(minute, 0) + 1
        cents = float(round(tx.amount_usd * 100))
        bucket = self._hours.get(hour)
        if bucket is None:
            self._hours[hour] = [1.0, cents, cents * cents]
        else:
            bucket[0] += 1.0
            bucket[1] += cents
            bucket[2] += cents * cents
        if self._currencies.get(tx.currency, hour) <= hour:
            self._currencies[tx.currency] = hour
        if hour > head_hour - _HOURS_24 and self._merchants.get(tx.merchant_id, hour) <= hour:
            self._merchants[tx.merchant_id] = hour
            if len(self._merchants) > MERCHANTS_KEPT:
                # The least recently used goes: the count saturates, it never undercounts
                # below the cap.
                del self._merchants[min(self._merchants, key=self._merchants.__getitem__)]
        return True

    def _advance(self, t: float) -> None:
        old = self._last
        self._last = t
        minute, hour = int(t // MINUTE), int(t // HOUR)
        if old is not None and minute == int(old // MINUTE):
            return
        # Bounded by the state's fixed size, and only when the head enters a new bucket.
        self._minutes = {k: c for k, c in self._minutes.items() if k > minute - _MINUTES_KEPT}
        if old is not None and hour == int(old // HOUR):
            return
        self._hours = {k: b for k, b in self._hours.items() if k > hour - _HOURS_KEPT}
        self._currencies = {c: k for c, k in self._currencies.items() if k > hour - _HOURS_KEPT}
        self._merchants = {m: k for m, k in self._merchants.items() if k > hour - _HOURS_24}

    def features(self, at: float) -> dict[str, float]:
        """The aggregates as seen at instant `at`, windows ending at `at`, in `FEATURES` order."""
        minute, hour = int(at // MINUTE), int(at // HOUR)

        count_1h = 0
        for k, n in self._minutes.items():
            if minute - _MINUTES_KEPT < k <= minute:
                count_1h += n

        n24 = s24 = n7 = s7 = q7 = 0.0
        by_hour_of_day = [0.0] * 24
        for k, (c, s, q) in self._hours.items():
            if hour - _HOURS_KEPT < k <= hour:
                n7 += c
                s7 += s
                q7 += q
                by_hour_of_day[k % 24] += c
                if k > hour - _HOURS_24:
                    n24 += c
                    s24 += s

        out = dict(DEFAULTS)
        out["txn_count_1h"] = float(count_1h)
        out["txn_count_24h"] = n24
        out["txn_count_7d"] = n7
        out["amount_sum_24h"] = s24 / 100
        out["amount_sum_7d"] = s7 / 100
        if n24:
            out["amount_mean_24h"] = s24 / n24 / 100
        if n7:
            mean = s7 / n7
            out["amount_mean_7d"] = mean / 100
            out["amount_std_7d"] = math.sqrt(max(q7 / n7 - mean * mean, 0.0)) / 100
            # Summed in a fixed order (hour of day), not the buckets' insertion order.
            out["hour_cos_7d"] = sum(map(operator.mul, by_hour_of_day, _HOUR_COS)) / n7
            out["hour_sin_7d"] = sum(map(operator.mul, by_hour_of_day, _HOUR_SIN)) / n7
        out["distinct_merchants_24h"] = float(
            sum(1 for k in self._merchants.values() if hour - _HOURS_24 < k <= hour)
        )
        if self._last is not None:
            out["seconds_since_last"] = min(max(at - self._last, 0.0), SECONDS_SINCE_LAST_CAP)
        for code, k in self._currencies.items():
            if hour - _HOURS_KEPT < k <= hour:
                out[_CURRENCY_FEATURE[code]] = 1.0
        return out

    @property
    def last_timestamp(self) -> float | None:
        """The newest timestamp applied (None for an account without transactions)."""
        return self._last

    def to_dict(self) -> dict[str, Any]:
        """A compact JSON-able form: only the buckets still kept, at most a few kB."""
        return {
            "v": STATE_FORMAT,
            "last": self._last,
            "m": [[k, c] for k, c in sorted(self._minutes.items())],
            "h": [[k, int(b[0]), b[1], b[2]] for k, b in sorted(self._hours.items())],
            "mer": [[m, k] for m, k in self._merchants.items()],
            "cur": [[c, k] for c, k in self._currencies.items()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AccountState:
        """The state `to_dict` wrote; ValueError if `data` is not one."""
        if not isinstance(data, Mapping) or data.get("v") != STATE_FORMAT:
            raise ValueError(f"not an account state of format {STATE_FORMAT}")
        state = cls()
        try:
            last = data["last"]
            if last is not None:
                state._last = _finite(last)
            state._minutes = {_int(k): _int(c) for k, c in data["m"]}
            state._hours = {
                _int(k): [float(_int(c)), _finite(s), _finite(q)] for k, c, s, q in data["h"]
            }
            state._merchants = {_str(m): _int(k) for m, k in data["mer"]}
            state._currencies = {_str(c): _int(k) for c, k in data["cur"]}
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed account state: {exc!r}") from None
        unknown = set(state._currencies) - set(USD_RATES)
        if unknown:
            raise ValueError(f"malformed account state: unknown currencies {sorted(unknown)}")
        if state._last is None and (state._minutes or state._hours):
            raise ValueError("malformed account state: buckets without a newest timestamp")
        return state

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AccountState):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"AccountState(last={self._last!r}, minutes={len(self._minutes)},"
            f" hours={len(self._hours)}, merchants={len(self._merchants)})"
        )


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _finite(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TypeError(f"expected a finite number, got {value!r}")
    return float(value)


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value
