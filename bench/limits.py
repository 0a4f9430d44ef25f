"""Rate limits at the edge, measured in one run: accuracy, the limiter's latency, the whole edge.

(i) Accuracy across replicas. Exactly the end-to-end test's scenario
    (`narthex.testing.platform.accuracy_run`): 4 gateway processes share the test Redis
    (NARTHEX_TEST_REDIS_URL, default 127.0.0.1:6379) under a private key prefix (deleted
    afterwards); a plan of 20 items/s, burst 40; 200 concurrent clients of tenant A and
    8 of tenant B, round-robin over the 4 gateways, send cost-1 requests back to back
    for 10 s. Printed: admitted items / (burst + rate x elapsed), over the limiter's
    window (Redis server time: read just before the first request, and the bucket's
    timestamp of its last admission) and over the clients' window (first request sent ->
    last answer read). 1.0 is exact; above 1.0 would mean the replicas together admitted
    more than the plan.

(ii) The limiter's added latency per request, over Redis on loopback. One gateway
    process, Redis limiter on, and one caller (the operator, with a JWT) on a plan so large
    that it is never refused, so every request takes the full path. wrk at 1 connection
    alternates between two routes of that same process that differ only in limiting:
    `GET /v1/models` (limited: plan lookup from the cache, cost, one EVALSHA round trip,
    RateLimit headers) and `GET /v1/admin/models` (not limited). Both check the same JWT,
    go through the same proxy middleware and the same upstream client to the same trivial
    upstream, which answers both alike. The difference of the two p50s (and p99s) is what
    the limiter adds; the rounds alternate their order so that drift hits both sides, and
    the median over the rounds is reported. Target: at most 0.3 ms at p50.

(iii) The whole edge: JWT check + limiter + daily quota + proxy (`GET /v1/models` with the
    JWT, Redis limiter on) against the bare aiohttp proxy of `bench/baseline.py` in front of
    the same upstream, wrk at 64 connections; the baseline runs before and after the gateway
    and the ratio is taken against their mean. Target: at least 0.6x. For context only, the
    same gateway's not-limited route (JWT + proxy) is measured in between: the gap between
    the two gateway rows is the limiter's cost in throughput.

(iv) The body path: `POST /v1/models/x/predict` with a 4-item, ~1 KB plain UTF-8 JSON body, the
    cost counted from it (narthex.gateway.cost: parsed once, forwarded untouched), against
    the same bare proxy forwarding the same body; the ratio is printed for context.

Everything listens on 127.0.0.1 and stops by itself; wrk must be on PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import orjson
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bench.proxy import BenchError, WrkResult, run_wrk, wrk_post
from narthex.testing.platform import (
    PREDICT,
    Admin,
    Edge,
    PlanNumbers,
    Spec,
    TenantRun,
    accuracy_run,
    edge,
    format_run,
    module_argv,
    running,
)
from narthex.testing.redis import REDIS_URL

ACCURACY_PLAN = PlanNumbers(rate=20.0, burst=40)
# Never refuses at loopback speeds: the limiter decides every request, and admits it.
UNLIMITED_PLAN = PlanNumbers(rate=100_000.0, burst=1_000_000, daily_quota=2_000_000_000)
LIMITED = "/v1/models"
NOT_LIMITED = "/v1/admin/models"
# Few items (the plan's rate caps items/s, at most 100k), each with some text to read.
POST_ITEMS = 4
POST_BODY = orjson.dumps(
    {"instances": [{"amount": 12.5, "note": "caf\u00e9 " * 40, "n": i} for i in range(POST_ITEMS)]}
)
TARGET_LATENCY_MS = 0.3
TARGET_RATIO = 0.6


@contextmanager
def private_prefix() -> Iterator[str]:
    """A key prefix of this run on the shared Redis; every key under it is deleted after."""
    prefix = f"narthex-bench:{secrets.token_hex(8)}"
    client = SyncRedis.from_url(REDIS_URL, socket_connect_timeout=3.0, socket_timeout=3.0)
    try:
        try:
            client.ping()
        except (RedisError, OSError) as exc:
            raise BenchError(f"Redis at {REDIS_URL} unreachable: {exc!r}") from exc
        yield prefix
    finally:
        try:
            keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


def gateway_env(prefix: str, replicas: int) -> dict[str, str]:
    return {"redis_url": REDIS_URL, "ratelimit_prefix": prefix, "replicas": str(replicas)}


# -- (i) accuracy -----------------------------------------------------------------------------


def accuracy(platform: Edge, seconds: float) -> tuple[TenantRun, TenantRun]:
    with private_prefix() as prefix:
        specs = [platform.gateway(f"gateway-{i}", **gateway_env(prefix, 4)) for i in range(4)]
        with running(specs, platform.directory) as gateways:
            admin = Admin(gateways[0].url, platform.admin_key)
            try:
                plan = admin.create_plan("bench-accuracy", ACCURACY_PLAN)
                a = admin.create_tenant("bench-a", plan)
                b = admin.create_tenant("bench-b", plan)
            finally:
                admin.close()

            async def measure() -> list[TenantRun]:
                redis = Redis.from_url(REDIS_URL)
                try:
                    return await accuracy_run(
                        [g.url for g in gateways],
                        redis,
                        prefix,
                        ACCURACY_PLAN,
                        [(a, 200), (b, 8)],
                        seconds,
                    )
                finally:
                    await redis.aclose()

            run_a, run_b = asyncio.run(measure())
    for run in (run_a, run_b):
        if run.errors or run.server_errors:
            raise BenchError(f"accuracy run had errors: {run.errors[:3]} {run.statuses}")
    return run_a, run_b


# -- (ii) and (iii) -----------------------------------------------------------------------------


def row(label: str, result: WrkResult) -> str:
    return (
        f"{label:<42}{result.rps:>10.1f}{result.p50_ms:>10.3f}{result.p99_ms:>10.3f}"
        f"{result.errors:>8}"
    )


def header() -> str:
    return f"{'case':<42}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}"


def latency_and_throughput(
    platform: Edge, rounds: int, latency_seconds: int, throughput_seconds: int
) -> tuple[float, float, float]:
    """(added p50 ms, added p99 ms, throughput ratio)."""
    with private_prefix() as prefix:
        baseline = Spec(
            "baseline",
            module_argv("bench.baseline", "--upstream", platform.upstream.url, "--port", "{port}"),
            ready_path="/",
        )
        gateway = platform.gateway("gateway-bench", **gateway_env(prefix, 1))
        with running([gateway, baseline], platform.directory) as (gw, base):
            admin = Admin(gw.url, platform.admin_key)
            try:
                plan = admin.create_plan("bench-unlimited", UNLIMITED_PLAN)
                admin.set_plan(platform.admin_tenant_id, plan)
            finally:
                admin.close()
            response = httpx.post(
                gw.url + "/v1/auth/token", headers={"X-API-Key": platform.admin_key}, timeout=10
            )
            response.raise_for_status()
            token = response.json()["access_token"]
            jwt = {"Authorization": f"Bearer {token}"}
            for path in (LIMITED, NOT_LIMITED):  # JWKS, plan cache, Redis script, connections
                check = httpx.get(gw.url + path, headers=jwt, timeout=10)
                if check.status_code != 200:
                    raise BenchError(f"{path}: {check.status_code} {check.text[:300]}")
                if (path == LIMITED) != ("ratelimit" in check.headers):
                    raise BenchError(f"{path}: RateLimit header presence is not as expected")
                run_wrk(gw.url + path, 1, 1, jwt)

            print("\n(ii) limiter latency: one gateway, Redis limiter on, wrk -t1 -c1")
            print(header())
            deltas_p50: list[float] = []
            deltas_p99: list[float] = []
            errors = 0
            for n in range(rounds):
                order = (LIMITED, NOT_LIMITED) if n % 2 == 0 else (NOT_LIMITED, LIMITED)
                results = {path: run_wrk(gw.url + path, latency_seconds, 1, jwt) for path in order}
                for path in order:
                    kind = "limited" if path == LIMITED else "not limited"
                    print(row(f"round {n + 1}: {path} ({kind})", results[path]))
                    errors += results[path].errors
                deltas_p50.append(results[LIMITED].p50_ms - results[NOT_LIMITED].p50_ms)
                deltas_p99.append(results[LIMITED].p99_ms - results[NOT_LIMITED].p99_ms)
            added_p50 = statistics.median(deltas_p50)
            added_p99 = statistics.median(deltas_p99)
            print("added per round, p50: " + ", ".join(f"{d:+.3f}" for d in deltas_p50) + " ms")
            print("added per round, p99: " + ", ".join(f"{d:+.3f}" for d in deltas_p99) + " ms")

            print("\n(iii) whole edge vs bare aiohttp proxy: wrk -t1 -c64")
            print(header())
            runs: list[tuple[str, WrkResult]] = []
            for label, url, headers in (
                ("baseline #1 (bench.baseline)", base.url + LIMITED, {}),
                ("gateway: JWT+limiter+quota+proxy", gw.url + LIMITED, jwt),
                ("gateway: JWT+proxy, not limited", gw.url + NOT_LIMITED, jwt),
                ("baseline #2 (bench.baseline)", base.url + LIMITED, {}),
            ):
                run_wrk(url, 2, 64, headers)  # warm-up, not measured
                result = run_wrk(url, throughput_seconds, 64, headers)
                runs.append((label, result))
                print(row(label, result))
                errors += result.errors
            if errors:
                raise BenchError(f"{errors} failed requests (non-2xx or socket errors)")
            base_rps = statistics.mean(r.rps for label, r in runs if label.startswith("baseline"))
            drift = (runs[3][1].rps - runs[0][1].rps) / runs[0][1].rps
            print(f"baseline drift between runs: {drift:+.1%}")
            ratio = runs[1][1].rps / base_rps
            print(
                f"ratios to the baseline mean: whole edge {ratio:.2f}x;"
                f" the same without the limiter (context) {runs[2][1].rps / base_rps:.2f}x"
            )

            # The body path: a limited POST whose cost is counted in its plain UTF-8 JSON
            # body (decoded once, forwarded untouched), against the same baseline proxy.
            print(
                f"\n(iv) POST {POST_ITEMS} items, {len(POST_BODY)} bytes of plain UTF-8 JSON:"
                " wrk -t1 -c64"
            )
            print(header())
            posts: dict[str, WrkResult] = {}
            for label, url in (
                ("baseline (bench.baseline)", base.url + PREDICT),
                ("gateway: JWT+body cost+limiter+proxy", gw.url + PREDICT),
            ):
                wrk_post(url, [POST_BODY], token, 2, 64)  # warm-up, not measured
                posts[label] = wrk_post(url, [POST_BODY], token, throughput_seconds, 64)
                print(row(label, posts[label]))
            post_ratio = posts["gateway: JWT+body cost+limiter+proxy"].rps / (
                posts["baseline (bench.baseline)"].rps
            )
            print(f"ratio to the baseline: whole edge with a body {post_ratio:.2f}x")
    return added_p50, added_p99, ratio


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.limits", description=__doc__)
    parser.add_argument("--accuracy-seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3, help="latency rounds (A/B, B/A, ...)")
    parser.add_argument("--latency-seconds", type=int, default=4, help="per wrk latency run")
    parser.add_argument("--duration", type=int, default=8, help="per wrk throughput run")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("error: wrk is not on PATH; install it with: apt-get install wrk", file=sys.stderr)
        return 2
    try:
        with (
            tempfile.TemporaryDirectory(prefix="narthex-bench-limits-") as tmp,
            edge(Path(tmp)) as platform,
        ):
            print(
                f"(i) accuracy: 4 gateways sharing Redis, plan {ACCURACY_PLAN.rate:g}/s burst"
                f" {ACCURACY_PLAN.burst}, {args.accuracy_seconds:g} s"
            )
            run_a, run_b = accuracy(platform, args.accuracy_seconds)
            print(format_run("A", run_a, ACCURACY_PLAN))
            print(format_run("B", run_b, ACCURACY_PLAN))
            added_p50, added_p99, ratio = latency_and_throughput(
                platform, args.rounds, args.latency_seconds, args.duration
            )
    except (BenchError, RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    print("\nsummary")
    for name, run in (("A (200 clients)", run_a), ("B (8 clients)", run_b)):
        print(
            f"  admitted/allowed, tenant {name}: {run.ratio(ACCURACY_PLAN):.4f}"
            f" (limiter window), {run.ratio(ACCURACY_PLAN, run.client_elapsed):.4f}"
            " (clients' window); must be <= 1 and >= 0.98"
        )
    print(
        f"  limiter adds {added_p50:.3f} ms at p50, {added_p99:.3f} ms at p99"
        f" (target p50 <= {TARGET_LATENCY_MS} ms: {verdict(added_p50 <= TARGET_LATENCY_MS)})"
    )
    print(
        f"  whole edge / bare aiohttp proxy throughput: {ratio:.2f}x"
        f" (target >= {TARGET_RATIO}x: {verdict(ratio >= TARGET_RATIO)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
