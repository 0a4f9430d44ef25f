"""Fairness under a flood, measured in one run against real processes (issue 10).

The scenario is `narthex.testing.flood`'s, which the end-to-end test asserts on: auth,
inference serving `minilm` and a gateway in front of it; a flooding tenant on a large plan
(40 clients sending 100-text embedding requests back to back, retrying refusals at once)
and a quiet tenant sending one one-text request every 200 ms. For each path (inference
directly; through the gateway):

  unloaded  the quiet tenant alone: its p50 and p99;
  loaded    the same during the flood: its p50, p99 and errors, and what the flooder got
            (served, refused with 503, other statuses);
  batch     one batch's compute time during the flood: the mean of inference's own
            `inference_compute_duration_seconds` over the loaded phase (and the mean
            batch size it ran);
  target    loaded p99 <= 3 x unloaded p99 + one batch's compute; printed as the ratio of
            loaded p99 to that bound (<= 1.00: met), with zero errors for the quiet tenant.

Through the gateway the quiet tenant's errors depend on the gateway counting inference's
backpressure (503 + Retry-After) as a breaker failure or not (issue 10's edge work).
Everything listens on 127.0.0.1 and stops by itself; the test Redis (NARTHEX_TEST_REDIS_URL,
default 127.0.0.1:6379) is used under a private prefix, deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from narthex.testing.flood import (
    FLOOD_CLIENTS,
    FLOOD_TEXTS,
    QUIET_INTERVAL,
    FloodStack,
    Traffic,
    flood,
    flood_stack,
    quiet_alone,
)

TARGET_FACTOR = 3.0
MODEL = {"model": "minilm", "version": "1"}


@dataclass(frozen=True)
class Compute:
    """inference's batch counters for minilm v1 at one moment."""

    batches: float
    seconds: float
    items: float
    full: float  # refusals by reason
    pushed_out: float

    def since(self, earlier: Compute) -> Compute:
        return Compute(
            self.batches - earlier.batches,
            self.seconds - earlier.seconds,
            self.items - earlier.items,
            self.full - earlier.full,
            self.pushed_out - earlier.pushed_out,
        )


def compute_counters(inference_url: str) -> Compute:
    text = httpx.get(inference_url + "/metrics", timeout=10).text
    values: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if all(labels.get(k) == v for k, v in MODEL.items()):
                values[(sample.name, labels.get("reason", ""))] = sample.value
    return Compute(
        batches=values.get(("inference_compute_duration_seconds_count", ""), 0.0),
        seconds=values.get(("inference_compute_duration_seconds_sum", ""), 0.0),
        items=values.get(("inference_batch_size_sum", ""), 0.0),
        full=values.get(("inference_queue_rejected_total", "full"), 0.0),
        pushed_out=values.get(("inference_queue_rejected_total", "pushed_out"), 0.0),
    )


@dataclass(frozen=True)
class PathResult:
    label: str
    unloaded: Traffic
    quiet: Traffic
    flooder: Traffic
    compute: Compute

    @property
    def batch_seconds(self) -> float:
        return self.compute.seconds / self.compute.batches if self.compute.batches else 0.0

    @property
    def bound(self) -> float:
        return TARGET_FACTOR * self.unloaded.percentile(99) + self.batch_seconds

    @property
    def ratio(self) -> float:
        return self.quiet.percentile(99) / self.bound


def measure(stack: FloodStack, seconds: float, *, through_gateway: bool) -> PathResult:
    label = "through the gateway" if through_gateway else "inference directly"
    print(f"\n{label}: the quiet tenant alone for {seconds:g} s ...", flush=True)
    unloaded = asyncio.run(quiet_alone(stack, seconds, through_gateway=through_gateway))
    print(f"{label}: the flood ({FLOOD_CLIENTS} clients) and the quiet tenant ...", flush=True)
    before = compute_counters(stack.inference.url)
    quiet, flooder = asyncio.run(flood(stack, seconds, through_gateway=through_gateway))
    counters = compute_counters(stack.inference.url).since(before)
    return PathResult(label, unloaded, quiet, flooder, counters)


def ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


def report(result: PathResult) -> None:
    quiet, unloaded, flooder, compute = (
        result.quiet,
        result.unloaded,
        result.flooder,
        result.compute,
    )
    others = {s: n for s, n in sorted(flooder.statuses.items()) if s not in (200, 503)}
    mean_batch = compute.items / compute.batches if compute.batches else 0.0
    verdict = "met" if result.ratio <= 1.0 and not quiet.failed else "MISSED"
    ratio = "n/a" if math.isnan(result.ratio) else f"{result.ratio:.2f}"
    print(f"\n{result.label}")
    print(
        f"  quiet tenant unloaded: {unloaded.served} requests, p50 {ms(unloaded.percentile(50))}"
        f" ms, p99 {ms(unloaded.percentile(99))} ms, errors {unloaded.failed}"
    )
    print(
        f"  quiet tenant loaded:   {quiet.served} requests, p50 {ms(quiet.percentile(50))} ms,"
        f" p99 {ms(quiet.percentile(99))} ms, errors {quiet.failed}"
        + (f" (first: {quiet.errors[0]})" if quiet.errors else "")
    )
    print(
        f"  one batch's compute:   {ms(result.batch_seconds)} ms (mean of {compute.batches:.0f}"
        f" batches, {mean_batch:.1f} texts each)"
    )
    print(
        f"  flooder: {flooder.served} served ({flooder.served * FLOOD_TEXTS} texts),"
        f" {flooder.statuses[503]} refused with 503 (inference: {compute.full:.0f} full,"
        f" {compute.pushed_out:.0f} pushed out), other statuses {others},"
        f" transport errors {flooder.transport_errors}"
    )
    print(
        f"  target: loaded p99 {ms(quiet.percentile(99))} ms <= {TARGET_FACTOR:g} x"
        f" {ms(unloaded.percentile(99))} + {ms(result.batch_seconds)} = {ms(result.bound)} ms:"
        f" ratio {ratio}, quiet errors {quiet.failed}: {verdict}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fairness", description=__doc__)
    parser.add_argument("--seconds", type=float, default=12.0, help="per phase")
    parser.add_argument(
        "--path",
        choices=("inference", "gateway", "both"),
        default="both",
        help="call inference directly, through the gateway, or both (default)",
    )
    args = parser.parse_args(argv)
    paths = {"inference": [False], "gateway": [True], "both": [False, True]}[args.path]
    print(
        f"flood: {FLOOD_CLIENTS} clients x {FLOOD_TEXTS} texts per request, back to back;"
        f" quiet tenant: 1 text every {QUIET_INTERVAL * 1000:.0f} ms; {args.seconds:g} s per"
        " phase. Starting auth, inference (minilm) and a gateway ...",
        flush=True,
    )
    with (
        tempfile.TemporaryDirectory(prefix="narthex-fairness-") as tmp,
        flood_stack(Path(tmp)) as stack,
    ):
        results = [measure(stack, args.seconds, through_gateway=g) for g in paths]
    for result in results:
        report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
