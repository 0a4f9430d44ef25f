"""A deterministic card-transaction simulator with labelled fraud, for the built-in fraud model.

Each account has habits: a home currency, a typical amount and how much it varies, a rate
of transactions per day, the hours it is active, a few favourite merchants and a mix of
channels. Legitimate activity also has what makes fraud hard to tell apart: occasional
big purchases, shopping sprees (bursts) and trips (another currency at other hours).

Some accounts are compromised once. A fraud episode is one of:
- card testing: a few tiny online payments, then large ones, minutes apart;
- takeover: a burst of large payments at new merchants, often at odd hours and
  sometimes in another currency;
- quiet: a few ordinary-looking payments at new merchants, hours apart (hard on purpose).

About 1-3 % of the transactions are fraud. The same arguments give the same events,
byte for byte: everything is drawn from one `numpy.random.default_rng(seed)`, in a
fixed order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from narthex.transactions.events import USD_RATES, Channel, Transaction

__all__ = ["START", "LabeledTransaction", "simulate"]

START = 1_735_689_600.0  # 2025-01-01T00:00:00Z
_DAY = 86_400.0
_HOUR = 3_600.0

_CURRENCIES = tuple(USD_RATES)
# Home currencies of the simulated accounts, in `_CURRENCIES` order (USD EUR GBP CHF CAD JPY).
_HOME_SHARES = np.array([0.55, 0.18, 0.10, 0.05, 0.08, 0.04])
_CHANNELS = tuple(Channel)
_COMPROMISED_SHARE = 0.28


@dataclass(frozen=True, slots=True)
class LabeledTransaction:
    transaction: Transaction
    is_fraud: bool


@dataclass(frozen=True, slots=True)
class _Habits:
    home: int  # index into _CURRENCIES
    typical_usd: float
    spread: float  # sigma of log amount
    per_day: float
    center_hour: float
    hour_spread: float
    favourites: np.ndarray  # merchant indices
    favourite_share: float
    channels: np.ndarray  # probabilities in _CHANNELS order


def _habits(rng: np.random.Generator, popularity: np.ndarray) -> _Habits:
    favourites = rng.choice(len(popularity), size=3 + rng.poisson(5), replace=False, p=popularity)
    return _Habits(
        home=int(rng.choice(len(_CURRENCIES), p=_HOME_SHARES)),
        typical_usd=float(rng.lognormal(3.2, 0.7)),
        spread=float(rng.uniform(0.3, 0.9)),
        per_day=float(np.clip(rng.gamma(2.0, 1.5), 0.3, 12.0)),
        center_hour=float(rng.normal(14.0, 3.0)),
        hour_spread=float(rng.uniform(1.5, 4.0)),
        favourites=favourites,
        favourite_share=float(rng.beta(6.0, 2.0)),
        channels=rng.dirichlet([6.0, 3.0, 1.0]),
    )


class _Events:
    """Column-wise accumulator of one account's transactions."""

    def __init__(self) -> None:
        self.times: list[np.ndarray] = []
        self.usd: list[np.ndarray] = []
        self.currency: list[np.ndarray] = []
        self.merchant: list[np.ndarray] = []
        self.channel: list[np.ndarray] = []
        self.fraud: list[np.ndarray] = []

    def add(
        self,
        times: np.ndarray,
        usd: np.ndarray,
        currency: np.ndarray,
        merchant: np.ndarray,
        channel: np.ndarray,
        *,
        fraud: bool,
    ) -> None:
        self.times.append(times)
        self.usd.append(usd)
        self.currency.append(currency)
        self.merchant.append(merchant)
        self.channel.append(channel)
        self.fraud.append(np.full(len(times), fraud))


def _legit(
    rng: np.random.Generator,
    h: _Habits,
    days: int,
    popularity: np.ndarray,
    out: _Events,
) -> None:
    n = int(rng.poisson(h.per_day * days))
    day = rng.integers(0, days, n).astype(np.float64)
    hour = rng.normal(h.center_hour, h.hour_spread, n)
    usd = h.typical_usd * rng.lognormal(0.0, h.spread, n)
    big = rng.random(n) < 0.03
    usd[big] *= rng.lognormal(1.6, 0.5, int(big.sum()))
    currency = np.full(n, h.home)
    # A trip: some days in another currency, at hours shifted by the time zone.
    if rng.random() < 0.2 and days > 3:
        first = int(rng.integers(0, days - 2))
        length = int(rng.integers(2, 6))
        away = (day >= first) & (day < first + length)
        currency[away] = rng.choice([c for c in range(len(_CURRENCIES)) if c != h.home])
        hour[away] += rng.normal(0.0, 5.0)
    merchant = np.where(
        rng.random(n) < h.favourite_share,
        rng.choice(h.favourites, size=n),
        rng.choice(len(popularity), size=n, p=popularity),
    )
    channel = rng.choice(len(_CHANNELS), size=n, p=h.channels)
    out.add(day * _DAY + hour * _HOUR, usd, currency, merchant, channel, fraud=False)

    # Shopping sprees: legitimate bursts of a few payments within an hour or two.
    for _ in range(int(rng.poisson(0.08 * days))):
        k = int(rng.integers(3, 7))
        begin = rng.integers(0, days) * _DAY + rng.normal(h.center_hour, h.hour_spread) * _HOUR
        times = begin + np.cumsum(rng.exponential(15 * 60, k))
        out.add(
            times,
            h.typical_usd * rng.lognormal(0.3, h.spread, k),
            np.full(k, h.home),
            rng.choice(len(popularity), size=k, p=popularity),
            np.full(k, _CHANNELS.index(Channel.POS)),
            fraud=False,
        )


def _fraud(rng: np.random.Generator, h: _Habits, days: int, merchants: int, out: _Events) -> None:
    kind = rng.choice(3, p=[0.25, 0.5, 0.25])  # card testing, takeover, quiet
    odd = rng.random() < 0.6
    center = h.center_hour + (rng.normal(12.0, 2.0) if odd else rng.normal(0.0, 2.0))
    # After a couple of days of history where there are that many.
    begin = rng.uniform(min(2.0, days / 2), days - 0.5) * _DAY
    begin = np.floor(begin / _DAY) * _DAY + center * _HOUR
    if kind == 2:
        k = int(rng.integers(1, 4))
        gaps = rng.exponential(4 * _HOUR, k)
        usd = h.typical_usd * rng.lognormal(0.4, 0.5, k)
    else:
        k = 2 + int(rng.poisson(4))
        gaps = rng.exponential(8 * 60, k)
        usd = np.maximum(h.typical_usd, 40.0) * rng.lognormal(1.2, 0.6, k)
        if kind == 0:
            tests = min(int(rng.integers(1, 4)), k - 1)
            usd[:tests] = rng.uniform(0.5, 5.0, tests)
    other = rng.random() < 0.35
    currency = rng.choice([c for c in range(len(_CURRENCIES)) if c != h.home]) if other else h.home
    channel = rng.choice(len(_CHANNELS), size=k, p=[0.15, 0.7, 0.15])
    out.add(
        begin + np.cumsum(gaps),
        usd,
        np.full(k, currency),
        rng.integers(0, merchants, k),
        channel,
        fraud=True,
    )


def simulate(
    *,
    seed: int = 0,
    accounts: int = 300,
    days: int = 30,
    start: float = START,
    merchants: int = 2_000,
) -> list[LabeledTransaction]:
    """`accounts` accounts over `days` days from `start` (UTC epoch seconds), sorted by time.

    Event ids are `sim<seed>-<index in time order>`, account ids `acct<n>`, merchant ids
    `m<n>`. Transactions falling outside [start, start + days) are dropped.
    """
    if accounts < 1 or days < 1 or merchants < 10:
        raise ValueError("need at least 1 account, 1 day and 10 merchants")
    rng = np.random.default_rng(seed)
    # A few merchants are popular, most are not (Zipf-like).
    weights = 1.0 / (np.arange(merchants) + 10.0)
    popularity = weights / weights.sum()

    columns: list[tuple[np.ndarray, ...]] = []
    for account in range(accounts):
        habits = _habits(rng, popularity)
        out = _Events()
        _legit(rng, habits, days, popularity, out)
        if rng.random() < _COMPROMISED_SHARE:
            _fraud(rng, habits, days, merchants, out)
        times = np.concatenate(out.times)
        columns.append(
            (
                times,
                np.full(len(times), account),
                np.concatenate(out.usd),
                np.concatenate(out.currency),
                np.concatenate(out.merchant),
                np.concatenate(out.channel),
                np.concatenate(out.fraud),
            )
        )
    times, account_ix, usd, currency, merchant, channel, fraud = (
        np.concatenate(c) for c in zip(*columns, strict=True)
    )
    times = np.round(start + times, 3)
    keep = (times >= start) & (times < start + days * _DAY)
    # Stable: ties keep the generation order, so the result never depends on the sort.
    order = np.argsort(times, kind="stable")
    order = order[keep[order]]

    rates = np.array([USD_RATES[c] for c in _CURRENCIES])
    usd = np.clip(usd, 0.5, 50_000.0)
    local = usd / rates[currency]
    # JPY has no minor unit; the others are paid in cents.
    decimals = np.where(np.array(_CURRENCIES)[currency] == "JPY", 0, 2)
    local = np.where(decimals == 0, np.maximum(np.round(local), 1.0), np.round(local, 2))

    out_list: list[LabeledTransaction] = []
    for i, j in enumerate(order.tolist()):
        tx = Transaction(
            event_id=f"sim{seed}-{i:07d}",
            account_id=f"acct{int(account_ix[j]):05d}",
            merchant_id=f"m{int(merchant[j]):05d}",
            amount=float(local[j]),
            currency=_CURRENCIES[int(currency[j])],
            timestamp=float(times[j]),
            channel=_CHANNELS[int(channel[j])],
        )
        out_list.append(LabeledTransaction(tx, bool(fraud[j])))
    return out_list
