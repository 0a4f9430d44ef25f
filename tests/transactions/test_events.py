"""Transactions: validation that names every bad field, USD conversion, JSON form."""

from __future__ import annotations

import math
from typing import Any

import pytest

from narthex.transactions import (
    USD_RATES,
    Channel,
    InvalidTransaction,
    Transaction,
    transaction_errors,
)

T0 = 1_735_689_600.0


def fields(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event_id": "e1",
        "account_id": "acct1",
        "merchant_id": "m1",
        "amount": 12.5,
        "currency": "USD",
        "timestamp": T0,
    }
    return base | overrides


def test_valid_transaction_normalises_types() -> None:
    tx = Transaction(**fields(amount=3, timestamp=int(T0), channel="online"))
    assert tx.channel is Channel.ONLINE
    assert isinstance(tx.amount, float)
    assert isinstance(tx.timestamp, float)
    assert transaction_errors(**fields()) == {}


def test_amount_usd_is_converted_and_rounded_to_cents() -> None:
    assert Transaction(**fields(amount=1000, currency="JPY")).amount_usd == 6.7
    assert Transaction(**fields(amount=10.0, currency="EUR")).amount_usd == 10.8
    assert Transaction(**fields(amount=0.333, currency="USD")).amount_usd == 0.33
    assert set(USD_RATES) == {"USD", "EUR", "GBP", "CHF", "CAD", "JPY"}


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"amount": -5.0}, "amount", "positive"),
        ({"amount": 0}, "amount", "positive"),
        ({"amount": math.nan}, "amount", "finite"),
        ({"amount": math.inf}, "amount", "finite"),
        ({"amount": 10**400}, "amount", "finite"),
        ({"amount": True}, "amount", "number"),
        ({"amount": "12"}, "amount", "number"),
        ({"amount": 2_000_000.0}, "amount", "at most"),
        ({"amount": 0.001}, "amount", "cent"),
        ({"currency": "XYZ"}, "currency", "one of"),
        ({"currency": "usd"}, "currency", "one of"),
        ({"event_id": ""}, "event_id", "characters"),
        ({"account_id": "a" * 129}, "account_id", "characters"),
        ({"merchant_id": "m 1"}, "merchant_id", "whitespace"),
        ({"merchant_id": "m\x001"}, "merchant_id", "control"),
        ({"account_id": 7}, "account_id", "string"),
        ({"timestamp": T0 * 1000}, "timestamp", "milliseconds"),
        ({"timestamp": math.nan}, "timestamp", "finite"),
        ({"timestamp": "now"}, "timestamp", "number"),
        ({"channel": "phone"}, "channel", "one of"),
        ({"channel": ["pos"]}, "channel", "one of"),
    ],
)
def test_each_bad_field_is_named_with_its_problem(
    overrides: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(InvalidTransaction) as caught:
        Transaction(**fields(**overrides))
    assert list(caught.value.errors) == [field]
    assert words in caught.value.errors[field]
    assert field in str(caught.value)


def test_all_problems_are_reported_at_once() -> None:
    errors = transaction_errors(**fields(amount=-1.0, currency="XXX", event_id=""))
    assert set(errors) == {"amount", "currency", "event_id"}


def test_from_dict_reports_missing_and_unknown_fields_with_bad_values() -> None:
    data = fields(amount=-1.0, colour="red")
    del data["currency"]
    with pytest.raises(InvalidTransaction) as caught:
        Transaction.from_dict(data)
    errors = caught.value.errors
    assert errors["currency"] == "is required"
    assert errors["colour"] == "is not a transaction field"
    assert "positive" in errors["amount"]


def test_json_round_trip() -> None:
    tx = Transaction(**fields(channel=Channel.ATM, currency="GBP"))
    assert Transaction.from_dict(tx.to_dict()) == tx
    assert tx.to_dict()["channel"] == "atm"
