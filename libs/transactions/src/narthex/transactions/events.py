"""A card transaction as the system receives it, its validation, and the fixed currency rates."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = [
    "MAX_AMOUNT_USD",
    "MAX_ID_LENGTH",
    "USD_RATES",
    "Channel",
    "InvalidTransaction",
    "Transaction",
    "transaction_errors",
]

# Fixed, not live, rates: the model is trained and served on the same conversion, and
# a rate feed would make replaying history (the training set) depend on when it ran.
USD_RATES: dict[str, float] = {
    "USD": 1.0,
    "EUR": 1.08,
    "GBP": 1.27,
    "CHF": 1.12,
    "CAD": 0.73,
    "JPY": 0.0067,
}

# Larger amounts are refused rather than aggregated: sums are kept in whole cents in
# floats, exact while they stay under 2**53 cents (see aggregates).
MAX_AMOUNT_USD = 1_000_000.0
MAX_ID_LENGTH = 128
# 2000-01-01 .. 2100-01-01 UTC: anything outside is a unit mistake (ms, say), not a date.
_MIN_TIMESTAMP = 946_684_800.0
_MAX_TIMESTAMP = 4_102_444_800.0


class Channel(StrEnum):
    """How the card was used."""

    POS = "pos"  # card present, at a terminal
    ONLINE = "online"  # card not present
    ATM = "atm"


_CHANNELS = frozenset(c.value for c in Channel)


def _id_error(value: object) -> str | None:
    if not isinstance(value, str):
        return "must be a string"
    if not 1 <= len(value) <= MAX_ID_LENGTH:
        return f"must be 1 to {MAX_ID_LENGTH} characters"
    # isprintable() refuses every whitespace character but the ASCII space.
    if not value.isprintable() or " " in value:
        return "must not contain whitespace or control characters"
    return None


def _number(value: object) -> float | None:
    # bool is an int, but `true` as an amount is a client bug, not 1.0.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:  # an int beyond float range
        return math.inf


def transaction_errors(
    *,
    event_id: object,
    account_id: object,
    merchant_id: object,
    amount: object,
    currency: object,
    timestamp: object,
    channel: object = Channel.POS,
) -> dict[str, str]:
    """What is wrong with these transaction fields, by field name; empty when valid.

    All problems are reported at once, so that a client can fix a request in one go.
    """
    errors: dict[str, str] = {}
    for field, value in (
        ("event_id", event_id),
        ("account_id", account_id),
        ("merchant_id", merchant_id),
    ):
        problem = _id_error(value)
        if problem:
            errors[field] = problem

    rate: float | None = None
    if not isinstance(currency, str) or currency not in USD_RATES:
        errors["currency"] = f"must be one of {', '.join(sorted(USD_RATES))}, not {currency!r}"
    else:
        rate = USD_RATES[currency]

    value = _number(amount)
    if value is None:
        errors["amount"] = "must be a number"
    elif not math.isfinite(value):
        errors["amount"] = "must be finite"
    elif value <= 0:
        errors["amount"] = f"must be positive, not {value}"
    elif rate is not None and value * rate > MAX_AMOUNT_USD:
        errors["amount"] = f"must be at most {MAX_AMOUNT_USD:,.0f} USD or its equivalent"
    elif rate is not None and round(value * rate, 2) <= 0:
        errors["amount"] = "must be at least one cent (USD) or its equivalent"

    when = _number(timestamp)
    if when is None:
        errors["timestamp"] = "must be a number (UTC epoch seconds)"
    elif not math.isfinite(when):
        errors["timestamp"] = "must be finite"
    elif not _MIN_TIMESTAMP <= when < _MAX_TIMESTAMP:
        errors["timestamp"] = (
            "must be UTC epoch seconds between 2000-01-01 and 2100-01-01 (milliseconds?)"
        )

    if not isinstance(channel, str) or channel not in _CHANNELS:
        errors["channel"] = f"must be one of {', '.join(c.value for c in Channel)}"
    return errors


_FIELDS = frozenset(
    ("event_id", "account_id", "merchant_id", "amount", "currency", "timestamp", "channel")
)


class InvalidTransaction(ValueError):
    """Transaction fields that cannot be accepted; `errors` maps each field to its problem."""

    def __init__(self, errors: dict[str, str]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{field}: {problem}" for field, problem in errors.items()))


@dataclass(frozen=True, slots=True)
class Transaction:
    """One card transaction. Constructing it validates it (`InvalidTransaction`)."""

    event_id: str
    account_id: str
    merchant_id: str
    # In `currency` units, > 0.
    amount: float
    currency: str
    # UTC epoch seconds.
    timestamp: float
    channel: Channel = Channel.POS

    def __post_init__(self) -> None:
        errors = transaction_errors(
            event_id=self.event_id,
            account_id=self.account_id,
            merchant_id=self.merchant_id,
            amount=self.amount,
            currency=self.currency,
            timestamp=self.timestamp,
            channel=self.channel,
        )
        if errors:
            raise InvalidTransaction(errors)
        # A plain string from JSON becomes the enum; amounts and times become floats.
        object.__setattr__(self, "channel", Channel(self.channel))
        object.__setattr__(self, "amount", float(self.amount))
        object.__setattr__(self, "timestamp", float(self.timestamp))

    @property
    def amount_usd(self) -> float:
        """The amount in USD, rounded to whole cents (what every aggregate accumulates)."""
        return round(self.amount * USD_RATES[self.currency], 2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Transaction:
        """From a JSON object; unknown or missing fields are reported like bad values."""
        required = ("event_id", "account_id", "merchant_id", "amount", "currency", "timestamp")
        errors = transaction_errors(
            **{field: data.get(field) for field in required},
            channel=data.get("channel", Channel.POS),
        )
        errors.update({field: "is required" for field in required if field not in data})
        errors.update(
            {field: "is not a transaction field" for field in data if field not in _FIELDS}
        )
        if errors:
            raise InvalidTransaction(errors)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "account_id": self.account_id,
            "merchant_id": self.merchant_id,
            "amount": self.amount,
            "currency": self.currency,
            "timestamp": self.timestamp,
            "channel": self.channel.value,
        }
