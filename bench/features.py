"""Online features, measured in one run: ingestion, batchGet, and fraud scoring with lookups.

Real processes on 127.0.0.1: auth (with the operator's admin key, `narthex.testing.platform.
edge`), the features service on the test Redis (NARTHEX_TEST_REDIS_URL, default
127.0.0.1:6379) under a private key prefix (deleted afterwards), and the inference service
serving the built-in `fraud` model with that features service behind it. Ingestion and
scoring carry the operator's JWT (scopes events and inference), batchGet inference's own
service credential (as inference itself does); each service verifies them against auth's
JWKS. The accounts are the operator's tenant's.

(1) Ingestion: `POST /v1/events/transactions`, batches of BATCH_EVENTS simulated
    transactions (`narthex.transactions.simulate`, moved to end a minute before now),
    INGEST_CONNECTIONS requests in flight. Every batch is sent once, in time order, from an
    asyncio client that adds up the `accepted` / `duplicates` / `stale` counts of each
    answer: events/s is what the service counted, not what was sent (a replayed batch
    would be all duplicates, and cheaper). The run ends when the batches or the time run
    out, whichever comes first.
(2) batchGet latency: `POST /internal/v1/features:batchGet` for 1 and for 64 accounts
    that (1) made known, wrk at 1 connection: p50 and p99.
(3) fraud throughput: `POST /v1/models/fraud/predict`, one transaction per request, wrk at
    FRAUD_CONNECTIONS connections: (i) the transaction's own fields with its `account_id`,
    so that the service looks the aggregates up once per formed batch; (ii) the same
    transactions as rows of the 19 model inputs (`narthex.transactions.model_input`, with
    aggregates from one batchGet made up front). A few (i) answers are checked for
    `"degraded": false` first, and the inference service's fallback counter is read around
    the (i) run: a lookup that fell back to the defaults is reported.

wrk must be on PATH. Everything stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np
import orjson

from bench.limits import private_prefix
from bench.proxy import BenchError, WrkResult, wrk_post
from narthex.testing.models import builtin_repository
from narthex.testing.platform import (
    edge,
    exchange,
    features_spec,
    running,
)
from narthex.testing.redis import REDIS_URL
from narthex.transactions import FEATURES, LabeledTransaction, Transaction, model_input, simulate
from narthex.transactions.lookup import BATCH_GET, encode_request

INGEST = "/v1/events/transactions"
PREDICT = "/v1/models/fraud/predict"
BATCH_EVENTS = 100
INGEST_CONNECTIONS = 8
ENTITY_COUNTS = (1, 64)
FRAUD_CONNECTIONS = 64
FRAUD_TRANSACTIONS = 256  # distinct bodies per fraud run (one transaction each)
SAMPLES = 8  # lookup answers checked for `"degraded": false` before the fraud runs
DAY = 86_400.0


# -- (1) ingestion -----------------------------------------------------------------------------


@dataclass
class Ingested:
    """What the service answered for the batches sent within one window."""

    accepted: int = 0
    duplicates: int = 0
    stale: int = 0
    requests: int = 0
    elapsed: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)  # indices of the batches sent

    @property
    def events_per_s(self) -> float:
        return self.accepted / self.elapsed if self.elapsed else 0.0

    def latency_ms(self, pct: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(pct / 100 * len(ordered)))]


async def ingest(
    url: str, token: str, bodies: Sequence[bytes], connections: int, seconds: float
) -> Ingested:
    """Send `bodies` in order, `connections` at a time, until none is left or `seconds`
    have passed; every answer must be 200, and its counts are added up."""
    result = Ingested()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    following = iter(range(len(bodies)))
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=30.0)
    async with aiohttp.ClientSession(
        connector=connector, headers=headers, timeout=timeout
    ) as session:
        started = time.perf_counter()
        deadline = started + seconds

        async def worker() -> None:
            for index in following:
                if time.perf_counter() >= deadline:
                    return
                sent = time.perf_counter()
                async with session.post(url, data=bodies[index]) as response:
                    payload = await response.read()
                    if response.status != 200:
                        raise BenchError(f"ingest answered {response.status}: {payload[:500]!r}")
                result.latencies_ms.append((time.perf_counter() - sent) * 1000)
                counts: dict[str, Any] = orjson.loads(payload)
                result.accepted += int(counts["accepted"])
                result.duplicates += int(counts["duplicates"])
                result.stale += int(counts["stale"])
                result.requests += 1
                result.sent.append(index)

        await asyncio.gather(*(worker() for _ in range(connections)))
        result.elapsed = time.perf_counter() - started
    return result


# -- (2), (3) helpers --------------------------------------------------------------------------


def batch_get(
    url: str, token: str, tenant: str, accounts: Sequence[str], at: float | None
) -> dict[str, Any]:
    """`tenant`'s `accounts`, asked for with `token` (inference's service credential)."""
    response = httpx.post(
        url + BATCH_GET,
        content=encode_request([(tenant, account) for account in accounts], at),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        timeout=10.0,
    )
    if response.status_code != 200:
        raise BenchError(f"batchGet answered {response.status_code}: {response.text[:500]}")
    answer: dict[str, Any] = response.json()
    return answer


def known_accounts(url: str, token: str, tenant: str, accounts: Sequence[str]) -> list[str]:
    """The accounts that batchGet knows (has events for), in the order given."""
    known: list[str] = []
    for start in range(0, len(accounts), 500):
        answer = batch_get(url, token, tenant, accounts[start : start + 500], None)
        known += [item["account"] for item in answer["features"] if item["known"]]
    return known


def lookup_instance(tx: Transaction) -> dict[str, Any]:
    """What a caller scoring `tx` now sends: its own fields and its account, no time or id."""
    return {
        "account_id": tx.account_id,
        "merchant_id": tx.merchant_id,
        "amount": tx.amount,
        "currency": tx.currency,
        "channel": tx.channel.value,
    }


def inline_rows(
    url: str, token: str, tenant: str, transactions: Sequence[Transaction], at: float
) -> list[list[float]]:
    """The model's rows for `transactions` scored at `at`, on aggregates read at `at`."""
    accounts = list(dict.fromkeys(tx.account_id for tx in transactions))
    answer = batch_get(url, token, tenant, accounts, at)
    if answer["schema"] != list(FEATURES):
        raise BenchError(f"batchGet's schema is not narthex.transactions.FEATURES: {answer}")
    aggregates = {item["account"]: item["values"] for item in answer["features"]}
    return [
        model_input(dataclasses.replace(tx, timestamp=at), aggregates[tx.account_id])
        for tx in transactions
    ]


def predict(url: str, token: str, body: bytes) -> list[dict[str, Any]]:
    response = httpx.post(
        url + PREDICT,
        content=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        timeout=10.0,
    )
    if response.status_code != 200:
        raise BenchError(f"predict answered {response.status_code}: {response.text[:500]}")
    predictions: list[dict[str, Any]] = response.json()["predictions"]
    return predictions


def metric_total(url: str, name: str) -> float:
    """The sum of every sample of `name` (all label sets) on the service's /metrics."""
    text = httpx.get(url + "/metrics", timeout=10.0).text
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})?\s+(\S+)$", re.M)
    return sum(float(value) for value in pattern.findall(text))


def fallback_reasons(url: str) -> dict[str, float]:
    """inference's fallbacks to the default features so far, by reason."""
    text = httpx.get(url + "/metrics", timeout=10.0).text
    pattern = re.compile(rf'^{re.escape(FALLBACKS)}{{reason="([^"]*)"}}\s+(\S+)$', re.M)
    return {reason: float(value) for reason, value in pattern.findall(text)}


FALLBACKS = "inference_feature_fallbacks_total"
LOOKUPS = "inference_feature_lookup_seconds_count"


# -- driver --------------------------------------------------------------------------------------


def row(label: str, rate: float, unit: str, p50: float, p99: float) -> str:
    return f"{label:<44} {rate:>9.0f} {unit:<9} {p50:>9.2f} {p99:>9.2f}"


def header() -> str:
    return f"{'case':<44} {'rate':>9} {'':<9} {'p50 ms':>9} {'p99 ms':>9}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.features", description=__doc__)
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument(
        "--ingest-seconds", type=float, default=10.0, help="longest ingestion window"
    )
    parser.add_argument("--accounts", type=int, default=4000, help="simulated accounts")
    parser.add_argument("--days", type=int, default=6, help="simulated days, ending now")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)

    print("building the fraud model if missing ...", flush=True)
    repository = builtin_repository(("fraud",))
    # Ends a minute before now: every event is in the past, within the last `days` days.
    start = float(int(time.time() - args.days * DAY - 60))
    simulated: list[LabeledTransaction] = simulate(
        seed=args.seed, accounts=args.accounts, days=args.days, start=start
    )
    transactions = [labeled.transaction for labeled in simulated]
    batches = [
        transactions[i : i + BATCH_EVENTS] for i in range(0, len(transactions), BATCH_EVENTS)
    ]
    bodies = [orjson.dumps({"events": [tx.to_dict() for tx in batch]}) for batch in batches]
    print(
        f"simulated {len(transactions)} transactions of {args.accounts} accounts over"
        f" {args.days} days: {len(bodies)} batches of {BATCH_EVENTS}",
        flush=True,
    )

    rng = np.random.default_rng(args.seed)
    with (
        tempfile.TemporaryDirectory(prefix="narthex-bench-") as tmp,
        private_prefix() as prefix,
    ):
        directory = Path(tmp)
        with edge(directory) as platform:
            specs = [features_spec("features", platform.auth.url, REDIS_URL, prefix)]
            with running(specs, directory, timeout=60) as (features,):
                spec = platform.inference(
                    "inference", repository, models="fraud", features_url=features.url
                )
                with running([spec], directory, timeout=120) as (inference,):
                    token = exchange(platform.auth.url, platform.admin_key)
                    service_token = exchange(platform.auth.url, platform.inference_key)
                    tenant = platform.admin_tenant_id

                    # (1) ingestion; the first batch alone first (JWKS fetch, connections).
                    ingest_url = features.url + INGEST
                    warm = asyncio.run(ingest(ingest_url, token, bodies[:1], 1, 30.0))
                    ingested = asyncio.run(
                        ingest(
                            ingest_url, token, bodies[1:], INGEST_CONNECTIONS, args.ingest_seconds
                        )
                    )
                    sent = [0, *(i + 1 for i in sorted(ingested.sent))]
                    if ingested.duplicates or warm.duplicates:
                        raise BenchError(f"distinct events counted as duplicates: {ingested}")

                    # Accounts with events, for (2) and (3).
                    sent_transactions = [tx for i in sent for tx in batches[i]]
                    candidates = list(dict.fromkeys(tx.account_id for tx in sent_transactions))
                    known = known_accounts(features.url, service_token, tenant, candidates)
                    if len(known) < max(ENTITY_COUNTS):
                        raise BenchError(f"only {len(known)} known accounts after ingestion")

                    # (2) batchGet latency, 1 connection.
                    lookups: dict[int, WrkResult] = {}
                    for count in ENTITY_COUNTS:
                        entity_bodies = [
                            encode_request(
                                [
                                    (tenant, account)
                                    for account in rng.choice(known, size=count, replace=False)
                                ],
                                None,
                            )
                            for _ in range(64)
                        ]
                        url = features.url + BATCH_GET
                        wrk_post(url, entity_bodies, service_token, 2, 1)  # warm-up
                        lookups[count] = wrk_post(
                            url, entity_bodies, service_token, args.duration, 1
                        )

                    # (3) fraud: the last transactions of known accounts, scored now.
                    known_set = set(known)
                    chosen = [
                        tx for tx in reversed(sent_transactions) if tx.account_id in known_set
                    ]
                    chosen = chosen[:FRAUD_TRANSACTIONS]
                    lookup_bodies = [
                        orjson.dumps({"instances": [lookup_instance(tx)]}) for tx in chosen
                    ]
                    rows = inline_rows(features.url, service_token, tenant, chosen, time.time())
                    inline_bodies = [orjson.dumps({"instances": [r]}) for r in rows]
                    differences: list[float] = []
                    for lookup_body, inline_body in zip(
                        lookup_bodies[:SAMPLES], inline_bodies[:SAMPLES], strict=True
                    ):
                        (looked_up,) = predict(inference.url, token, lookup_body)
                        if looked_up.get("degraded") is not False:
                            raise BenchError(
                                f"a lookup prediction is not `degraded: false`: {looked_up}"
                                f" (inference log: {directory / 'inference.log'})"
                            )
                        (given,) = predict(inference.url, token, inline_body)
                        differences.append(
                            abs(looked_up["probabilities"][1] - given["probabilities"][1])
                        )

                    predict_url = inference.url + PREDICT
                    fraud: dict[str, WrkResult] = {}
                    fallbacks = batches_looked_up = 0.0
                    reasons: dict[str, float] = {}
                    for label, fraud_bodies in (
                        ("inline", inline_bodies),
                        ("lookup", lookup_bodies),
                    ):
                        wrk_post(predict_url, fraud_bodies, token, 2, FRAUD_CONNECTIONS)
                        before = metric_total(inference.url, FALLBACKS)
                        reasons_before = fallback_reasons(inference.url)
                        lookups_before = metric_total(inference.url, LOOKUPS)
                        fraud[label] = wrk_post(
                            predict_url, fraud_bodies, token, args.duration, FRAUD_CONNECTIONS
                        )
                        if label == "lookup":
                            fallbacks = metric_total(inference.url, FALLBACKS) - before
                            reasons = {
                                reason: count - reasons_before.get(reason, 0.0)
                                for reason, count in fallback_reasons(inference.url).items()
                                if count > reasons_before.get(reason, 0.0)
                            }
                            batches_looked_up = (
                                metric_total(inference.url, LOOKUPS) - lookups_before
                            )

    print(f"\n(1) ingestion, {INGEST_CONNECTIONS} connections, {BATCH_EVENTS} events per request")
    print(header())
    print(
        row(
            f"POST {INGEST} ({ingested.requests} batches)",
            ingested.events_per_s,
            "events/s",
            ingested.latency_ms(50),
            ingested.latency_ms(99),
        )
    )
    print(
        f"  in {ingested.elapsed:.1f} s: accepted {ingested.accepted}, duplicates"
        f" {ingested.duplicates}, stale {ingested.stale}"
        f" ({len(bodies) - 1 - ingested.requests} batches left unsent at the time limit)"
    )

    print("\n(2) batchGet, wrk -t1 -c1")
    print(header())
    for count, result in lookups.items():
        print(row(f"{BATCH_GET} x{count}", result.rps, "req/s", result.p50_ms, result.p99_ms))

    print(f"\n(3) fraud, wrk -t1 -c{FRAUD_CONNECTIONS}, one transaction per request")
    print(header())
    for label, result in fraud.items():
        print(row(f"{PREDICT} {label}", result.rps, "req/s", result.p50_ms, result.p99_ms))
    lookup, inline = fraud["lookup"], fraud["inline"]
    requests_per_lookup = lookup.requests / batches_looked_up if batches_looked_up else 0.0
    print(
        f"  lookup: {batches_looked_up:.0f} batchGet calls for {lookup.requests} requests"
        f" ({requests_per_lookup:.1f} per formed batch), {fallbacks:.0f} fell back to defaults"
        f" {reasons or ''};"
        f" {SAMPLES} sampled before: degraded false, |p(lookup) - p(inline)| <="
        f" {max(differences):.2g}"
    )

    print("\nsummary")
    print(
        f"  ingestion: {ingested.events_per_s:.0f} events/s accepted ({INGEST_CONNECTIONS}"
        f" connections x {BATCH_EVENTS} events; p50 {ingested.latency_ms(50):.1f} ms,"
        f" p99 {ingested.latency_ms(99):.1f} ms per batch)"
    )
    print(
        "  batchGet at 1 connection: "
        + "; ".join(
            f"{count} account{'s' if count > 1 else ''} p50 {r.p50_ms:.2f} ms,"
            f" p99 {r.p99_ms:.2f} ms"
            for count, r in lookups.items()
        )
    )
    print(
        f"  fraud at {FRAUD_CONNECTIONS} connections: lookup {lookup.rps:.0f} req/s"
        f" (p50 {lookup.p50_ms:.1f}, p99 {lookup.p99_ms:.1f} ms) vs inline {inline.rps:.0f}"
        f" req/s (p50 {inline.p50_ms:.1f}, p99 {inline.p99_ms:.1f} ms):"
        f" lookup/inline = {lookup.rps / inline.rps:.2f}x;"
        f" {fallbacks:.0f} of {batches_looked_up:.0f} lookups degraded"
    )
    if statistics.fmean(differences) > 0.05:
        print("  WARNING: lookup and inline scores of the same transactions differ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
