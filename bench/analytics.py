"""Usage analytics, measured in one run: the edge with events on vs off, events/s end to end,
and the consumer's lag under a steady load.

Processes (all on 127.0.0.1, stopped at the end): a private append-only redis-server (as
`narthex up` runs one), auth, the trivial upstream, one analytics process (SQLite), and two
gateways in front of the same upstream that differ only in `NARTHEX_GATEWAY_EVENTS` (both
keep their rate limits in that Redis). One tenant on a plan that is never refused.

(i) The whole edge's throughput with usage events on vs off: wrk POSTs one-item predictions
    to each gateway, in rounds of off, on, on, off; the ratio is the median of on / off
    over neighbouring runs, so that a machine whose speed drifts (a shared one) moves both
    sides of each ratio alike. The analytics consumer runs on the same cores meanwhile, so
    its work is part of the cost of "on". Target: at least 0.9x.
(ii) Events/s end to end: wrk drives the events-on gateway as hard as it can for a while;
    from its start until the analytics group has acknowledged every event the stream got
    (gateway -> buffer -> Redis -> consumer -> aggregates committed), events / seconds.
(iii) Consumer lag at a steady rate: an open-loop client paces requests at --rate (1,000/s
    by default; the rate this machine actually sustained is printed, and is the one to
    quote), while the age of the oldest event not yet acknowledged (pending, or not yet
    delivered; stream ids are millisecond timestamps) is sampled every 50 ms; its p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis

from bench.proxy import BenchError, WrkResult, wrk_post
from narthex.testing.analytics import AnalyticsProcess, metric_sum
from narthex.testing.databases import sqlite_url
from narthex.testing.platform import (
    ONE_ITEM,
    PREDICT,
    Admin,
    PlanNumbers,
    PrivateRedis,
    edge,
    exchange,
    running,
)

STREAM = "narthex:events:usage"
GROUP = "analytics"
UNLIMITED = PlanNumbers(rate=100_000.0, burst=1_000_000, daily_quota=2_000_000_000)
TARGET_RATIO = 0.9


async def _group(redis: Redis) -> dict[str, Any]:
    for group in await redis.xinfo_groups(STREAM):
        if group["name"] in (GROUP, GROUP.encode()):
            return dict(group)
    raise BenchError("the analytics consumer group does not exist")


DRAIN_LIMIT_S = 120.0


async def drained_at(redis: Redis, gateway: str) -> float:
    """time.monotonic() once the gateway's buffer is empty and the group has read and
    acknowledged every entry written."""
    deadline = time.monotonic() + DRAIN_LIMIT_S
    while await asyncio.to_thread(metric_sum, gateway, "events_buffered"):
        if time.monotonic() > deadline:
            raise BenchError("the gateway's event buffer did not empty within 120 s")
        await asyncio.sleep(0.02)
    while time.monotonic() < deadline:
        info = await redis.xinfo_stream(STREAM)
        group = await _group(redis)
        if int(group["entries-read"] or 0) >= int(info["entries-added"]) and not int(
            group["pending"]
        ):
            return time.monotonic()
        await asyncio.sleep(0.02)
    raise BenchError("the consumer did not catch up within 120 s")


def _ms(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])


async def oldest_unacknowledged_ms(redis: Redis) -> float:
    """Age (ms) of the oldest entry the group has not acknowledged; 0 when there is none."""
    group = await _group(redis)
    pending = (await redis.xpending(STREAM, GROUP))["min"] if int(group["pending"]) else None
    if pending is not None:  # None too when acknowledged between the two calls
        oldest = _ms(pending)
    else:
        last = group["last-delivered-id"]
        last = last.decode() if isinstance(last, bytes) else last
        after: Any = await redis.xrange(STREAM, min="(" + last, count=1)
        if not after:
            return 0.0
        oldest = _ms(after[0][0])
    return max(0.0, time.time() * 1000 - oldest)


async def steady(
    url: str, headers: dict[str, str], rate: float, seconds: float, redis: Redis
) -> tuple[float, list[float], int]:
    """Paced requests at `rate`/s for `seconds`; (achieved rate, lag samples ms, errors)."""
    samples: list[float] = []
    done = 0
    errors = 0
    stop = time.monotonic() + seconds
    connections = 32
    interval = connections / rate

    async def client(session: aiohttp.ClientSession, offset: float) -> None:
        nonlocal done, errors
        next_at = time.monotonic() + offset
        while next_at < stop:
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                async with session.post(PREDICT, data=ONE_ITEM, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
            done += 1
            next_at += interval

    async def sample() -> None:
        while time.monotonic() < stop:
            samples.append(await oldest_unacknowledged_ms(redis))
            await asyncio.sleep(0.05)

    started = time.monotonic()
    async with aiohttp.ClientSession(
        base_url=url, connector=aiohttp.TCPConnector(limit=connections)
    ) as session:
        await asyncio.gather(
            sample(), *(client(session, i * interval / connections) for i in range(connections))
        )
    return done / (time.monotonic() - started), samples, errors


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(pct / 100 * len(ordered)))] if ordered else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.analytics", description=__doc__)
    parser.add_argument("--duration", type=int, default=5, help="per wrk run, seconds")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of off/on/on/off")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--rate", type=float, default=1000.0, help="steady load, requests/s")
    parser.add_argument("--steady-seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None or shutil.which("redis-server") is None:
        print(
            "error: needs wrk and redis-server (apt-get install wrk redis-server)", file=sys.stderr
        )
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="narthex-bench-analytics-") as tmp:
            return _run(Path(tmp), args)
    except (BenchError, RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _run(directory: Path, args: argparse.Namespace) -> int:
    redis_server = PrivateRedis(directory, ["--appendonly", "yes"])
    redis_server.start()
    analytics: AnalyticsProcess | None = None
    try:
        with edge(directory) as platform:
            analytics = AnalyticsProcess(
                directory,
                "analytics",
                {
                    "NARTHEX_ANALYTICS_AUTH_URL": platform.auth.url,
                    "NARTHEX_ANALYTICS_DATABASE_URL": sqlite_url(directory, "analytics.db"),
                    "NARTHEX_ANALYTICS_REDIS_URL": redis_server.url,
                    "NARTHEX_ANALYTICS_LOG_LEVEL": "WARNING",
                },
            )
            analytics.start()
            quiet = {"log_level": "WARNING", "redis_url": redis_server.url}
            specs = [
                platform.gateway("gateway-on", **quiet),
                platform.gateway("gateway-off", events="false", **quiet),
            ]
            with running(specs, directory) as (on, off):
                admin = Admin(on.url, platform.admin_key)
                tenant = admin.create_tenant("bench", admin.create_plan("bench", UNLIMITED))
                admin.close()
                token = exchange(on.url, tenant.key)
                pids = {
                    "on": on.process.pid,
                    "off": off.process.pid,
                    "analytics": analytics.process.pid if analytics.process else 0,
                }
                return asyncio.run(_measure(args, on.url, off.url, token, redis_server.url, pids))
    finally:
        if analytics is not None:
            analytics.stop()
        redis_server.stop()


async def _measure(
    args: argparse.Namespace, on: str, off: str, token: str, url: str, pids: dict[str, int]
) -> int:
    redis = Redis.from_url(url)
    try:
        return await _phases(args, on, off, token, redis, pids)
    finally:
        await redis.aclose()


async def _phases(
    args: argparse.Namespace, on: str, off: str, token: str, redis: Redis, pids: dict[str, int]
) -> int:
    def wrk(url: str) -> WrkResult:
        return wrk_post(url + PREDICT, [ONE_ITEM], token, args.duration, args.connections)

    print(
        f"(i) edge throughput, events on vs off: wrk {args.connections} connections,"
        f" {args.duration} s per run, {args.rounds} rounds of off/on/on/off"
    )
    wrk(on)  # warm-up: connections, caches, the consumer's first rounds
    pairs: list[float] = []
    # CPU per request of each gateway process, and the consumer's per event: what "on"
    # costs, whatever else the machine is doing.
    cpu_us: dict[str, list[float]] = {"on": [], "off": [], "analytics": []}
    for _ in range(args.rounds):
        rps: dict[str, list[float]] = {"on": [], "off": []}
        for label in ("off", "on", "on", "off"):
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            result = await asyncio.to_thread(wrk, on if label == "on" else off)
            used = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
            rps[label].append(result.rps)
            cpu_us[label].append(used[label] / result.requests * 1e6)
            if label == "on":
                cpu_us["analytics"].append(used["analytics"] / result.requests * 1e6)
            print(
                f"  events {label:<3}  {result.rps:8.0f} req/s  p50 {result.p50_ms:.2f} ms"
                f"  p99 {result.p99_ms:.2f} ms  gateway CPU {cpu_us[label][-1]:.0f} us/request"
            )
        # Neighbours compared: a machine whose speed drifts (it is shared) moves both alike.
        pairs += [rps["on"][0] / rps["off"][0], rps["on"][1] / rps["off"][1]]
    ratio = statistics.median(pairs)
    print(f"  on/off of neighbouring runs: {', '.join(f'{r:.3f}' for r in pairs)}")
    gateway_cost = statistics.median(cpu_us["on"]) / statistics.median(cpu_us["off"])
    consumer_us = statistics.median(cpu_us["analytics"])
    await drained_at(redis, on)

    print("\n(ii) events/s end to end (gateway -> Redis -> analytics, committed)")
    written_before = await asyncio.to_thread(metric_sum, on, "events_written_total")
    started = time.monotonic()
    result = await asyncio.to_thread(wrk, on)
    finished = await drained_at(redis, on)
    # Entries carry batches of events: the events are counted where they are written.
    events = int(await asyncio.to_thread(metric_sum, on, "events_written_total") - written_before)
    e2e = events / (finished - started)
    behind = finished - started - args.duration
    print(
        f"  {events} events in {finished - started:.1f} s: {e2e:,.0f} events/s"
        f" (load {result.rps:,.0f} req/s; the consumer finished {behind:.1f} s after it)"
    )

    print(f"\n(iii) consumer lag at a steady {args.rate:,.0f} req/s for {args.steady_seconds:g} s")
    achieved, samples, errors = await steady(
        on, {"Authorization": f"Bearer {token}"}, args.rate, args.steady_seconds, redis
    )
    lag_p50, lag_p99 = percentile(samples, 50), percentile(samples, 99)
    print(
        f"  achieved {achieved:,.0f} req/s ({errors} errors); age of the oldest"
        f" unacknowledged event over {len(samples)} samples: p50 {lag_p50:.0f} ms,"
        f" p99 {lag_p99:.0f} ms"
    )

    verdict = "met" if ratio >= TARGET_RATIO else "MISSED"
    print("\nsummary")
    print(
        f"  edge throughput, events on / off: {ratio:.3f}x (target >= {TARGET_RATIO}x: {verdict})"
    )
    print(
        f"  gateway CPU per request, events on / off: {gateway_cost:.3f}x;"
        f" analytics consumer CPU: {consumer_us:.0f} us per event (same cores)"
    )
    print(f"  end to end: {e2e:,.0f} events/s")
    rate_note = "" if achieved >= 0.95 * args.rate else " (the most this machine sustained)"
    print(f"  consumer lag p99 at {achieved:,.0f} req/s{rate_note}: {lag_p99:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
