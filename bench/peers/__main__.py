"""`make bench-peers`: narthex side by side with real peers, ratios measured in one run.

Edge (one worker each, the same trivial upstream, the same RS256 JWT, wrk -t1 -c64 on
`GET /v1/models`): narthex's whole edge (JWT + Redis limiter + daily quota + proxy), Envoy
(jwt_authn + per-tenant local_ratelimit), HAProxy (jwt_verify + a per-tenant stick table)
and the bare aiohttp proxy of `bench.baseline` (no checks at all). Two more rows place
narthex: the same gateway without the access log, spans and usage events that the peers here do
not have either (like for like), and narthex's HTTP server answering from memory
(`bench.floor`), what any edge on this server costs before it does anything.

Inference (minilm, one ~16-token text per request, wrk -t1 -c64): narthex's inference
service, PyTriton on the same model.onnx with the same batch settings and instance count,
infinity-emb on the same weights, and raw ONNX Runtime's best batch in this process
(texts/s, the ceiling: its best batch size on its best session options, ONNX Runtime's
defaults, the service's own, or the service's with runners at once as its instances).

Before anything is timed, every edge must refuse a forged, an unsigned and an expired token
and accept the real one; Envoy and HAProxy, started once more with small buckets, must
refuse one tenant past its bucket and still admit another; every embedding server must
return narthex's vectors (cosine > 0.999). Beside req/s, the edge table gives each server
process's CPU microseconds per request, the figure a busy shared machine disturbs least.

The targets run in rounds, their order rotating each round, so that whatever else the
machine does hits every target alike; each row is the mean of its rounds. Raw ONNX Runtime
takes its turn in the inference rounds too. The peers are
installed on first use under `.tools/peers/` (bench.peers.install), never in the lock.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.inference import minilm_raw, raw_instances
from bench.limits import gateway_env, private_prefix
from bench.peers import edges, embedders
from bench.proxy import BenchError, WrkResult, run_wrk, wrk_post
from narthex.testing.models import builtin_repository
from narthex.testing.platform import Edge, edge, exchange, inference_spec, running
from narthex.testing.texts import texts

EDGE_TARGET = 0.75  # narthex's whole edge / Envoy
# The same gateway without what neither peer does as configured here: the access log line,
# the server span and the usage event of each request (measured: about a third of the
# gateway's CPU per request). What the edge costs like for like, beside what it costs whole.
QUIET = {"access_log_sample_rate": "0", "tracing": "false", "events": "false"}
QUIET_ROW = "narthex-quiet"
QUIET_LACKS = "no access log line, no span, no usage event (as Envoy and HAProxy here)"
INFERENCE_VS_RAW = 0.95
INFERENCE_VS_TRITON = 1.1
MIN_COSINE = 0.999
SAMPLE_TEXTS = 8


@dataclass
class Row:
    """One target's rounds (and the CPU its server process spent on them, where known)."""

    name: str
    lacks: str
    runs: list[WrkResult]
    cpu_us: float | None = None  # CPU microseconds per request, the server process alone
    fixed_rate: float | None = None  # a rate measured without wrk (raw ONNX Runtime)

    @property
    def rps(self) -> float:
        if self.fixed_rate is not None:
            return self.fixed_rate
        return statistics.mean(r.rps for r in self.runs)

    @property
    def p50(self) -> float:
        return statistics.median(r.p50_ms for r in self.runs)

    @property
    def p99(self) -> float:
        return statistics.median(r.p99_ms for r in self.runs)

    @property
    def spread(self) -> float:
        """(max - min) / mean of the rounds' req/s: how steady the machine was."""
        rates = [r.rps for r in self.runs]
        return (max(rates) - min(rates)) / statistics.mean(rates)


def rounds(
    names: Sequence[str], count: int, measure: Callable[[str], WrkResult]
) -> dict[str, list[WrkResult]]:
    """`count` rounds over `names`, each round starting one further along (A B C, B C A, ...)."""
    results: dict[str, list[WrkResult]] = {name: [] for name in names}
    for n in range(count):
        order = [*names[n % len(names) :], *names[: n % len(names)]]
        for name in order:
            result = measure(name)
            if result.errors:
                raise BenchError(f"{name}: {result.errors} failed requests: {result}")
            results[name].append(result)
            print(f"  round {n + 1} {name:<16} {result.rps:>9.1f} req/s", file=sys.stderr)
    return results


def table(rows: Sequence[Row], reference: str, unit: str = "req/s") -> None:
    """Print the rows; `ratio` is narthex's rate over the row's (above 1: narthex is faster)."""
    ours = next(r for r in rows if r.name == reference).rps
    print(
        f"{'target':<16}{unit:>10}{'p50 ms':>9}{'p99 ms':>9}{'spread':>8}"
        f"{'narthex/this':>14}{'CPU us/req':>12}  does not do"
    )
    for row in rows:
        p50 = f"{row.p50:.2f}" if row.runs else "-"
        p99 = f"{row.p99:.2f}" if row.runs else "-"
        spread = f"{row.spread:.0%}" if len(row.runs) > 1 else "-"
        cpu = "-" if row.cpu_us is None else f"{row.cpu_us:.0f}"
        print(
            f"{row.name:<16}{row.rps:>10.1f}{p50:>9}{p99:>9}{spread:>8}"
            f"{ours / row.rps:>13.2f}x{cpu:>12}  {row.lacks}"
        )


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


# -- the edge ------------------------------------------------------------------------------------


def edge_table(platform: Edge, args: argparse.Namespace) -> float:
    """Run the edge comparison; returns narthex / Envoy."""
    jwks = httpx.get(platform.auth.url + "/.well-known/jwks.json", timeout=10).json()
    upstream_port = int(platform.upstream.url.rsplit(":", 1)[1])
    peers = edges.peers(platform.directory, jwks, upstream_port)
    base = edges.baseline(platform.upstream.url)
    floor = edges.floor()
    small = edges.peers(platform.directory, jwks, upstream_port, small=True)
    with running([p.spec for p in small], platform.directory) as services:
        print("sanity: every peer keeps a bucket per tenant (sub): one is refused, another not")
        noisy, quiet = edges.tenant_tokens(platform, ["t_bench_noisy", "t_bench_quiet"])
        for peer, service in zip(small, services, strict=True):
            problem = edges.per_tenant(service.url + edges.PATH, noisy, quiet)
            if problem:
                raise BenchError(f"{peer.name}: {problem}")
            print(f"  {peer.name}: refuses a tenant past its bucket, admits the next tenant")
    with private_prefix() as prefix:
        gateway = platform.gateway("gateway", **gateway_env(prefix, 1))
        quiet_gateway = platform.gateway("gateway-quiet", **gateway_env(prefix, 1), **QUIET)
        specs = [gateway, quiet_gateway, *(p.spec for p in peers), base.spec, floor.spec]
        with running(specs, platform.directory) as services:
            gw, gw_quiet, *peer_services, base_service, floor_service = services
            token = edges.unlimited_token(platform, gw.url)
            urls = {
                "narthex": gw.url,
                QUIET_ROW: gw_quiet.url,
                base.name: base_service.url,
                floor.name: floor_service.url,
            }
            urls.update({p.name: s.url for p, s in zip(peers, peer_services, strict=True)})
            lacks = {
                "narthex": "-",
                QUIET_ROW: QUIET_LACKS,
                base.name: base.lacks,
                floor.name: floor.lacks,
                **{p.name: p.lacks for p in peers},
            }

            print("sanity: every edge refuses bad tokens and admits the real one", flush=True)
            bad = edges.forged(token)
            for name, url in urls.items():
                if name in (base.name, floor.name):
                    continue
                problems = edges.refuses(url + edges.PATH, bad, token)
                if problems:
                    raise BenchError(f"{name}: " + "; ".join(problems))
                print(f"  {name}: refuses {', '.join(bad)} and no token; admits the real one")

            jwt = {"Authorization": f"Bearer {token}"}
            for url in urls.values():  # warm-up: JWKS, plan cache, Redis script, connections
                run_wrk(url + edges.PATH, args.warmup, args.connections, jwt)

            pids = {
                "narthex": gw.process.pid,
                QUIET_ROW: gw_quiet.process.pid,
                base.name: base_service.process.pid,
                floor.name: floor_service.process.pid,
            }
            pids.update({p.name: s.process.pid for p, s in zip(peers, peer_services, strict=True)})
            cpu = dict.fromkeys(urls, 0.0)

            def measure(name: str) -> WrkResult:
                before = edges.cpu_seconds(pids[name])
                result = run_wrk(urls[name] + edges.PATH, args.duration, args.connections, jwt)
                cpu[name] += edges.cpu_seconds(pids[name]) - before
                return result

            results = rounds(list(urls), args.rounds, measure)
    rows = [
        Row(name, lacks[name], runs, 1e6 * cpu[name] / sum(r.requests for r in runs))
        for name, runs in results.items()
    ]
    print(
        f"\nedge: GET {edges.PATH} with the same JWT, one worker each, wrk -t1"
        f" -c{args.connections} -d{args.duration}s x {args.rounds} rounds (mean)"
    )
    table(rows, "narthex")
    by_name = {r.name: r for r in rows}
    ratio = by_name["narthex"].rps / by_name["envoy"].rps
    print(
        f"narthex whole edge / Envoy: {ratio:.2f}x (target >= {EDGE_TARGET}:"
        f" {verdict(ratio >= EDGE_TARGET)}); / HAProxy:"
        f" {by_name['narthex'].rps / by_name['haproxy'].rps:.2f}x;"
        f" / bare aiohttp proxy: {by_name['narthex'].rps / by_name[base.name].rps:.2f}x"
    )
    print(
        f"like for like (narthex without what the peers here do not do either) / Envoy:"
        f" {by_name[QUIET_ROW].rps / by_name['envoy'].rps:.2f}x"
    )
    cpu_envoy = by_name["envoy"].cpu_us
    if cpu_envoy:
        print(
            "by CPU per request (what a busy machine disturbs least): Envoy / narthex ="
            f" {cpu_envoy / (by_name['narthex'].cpu_us or 1):.2f}x;"
            f" Envoy / narthex like for like = {cpu_envoy / (by_name[QUIET_ROW].cpu_us or 1):.2f}x"
        )
    return ratio


# -- inference -----------------------------------------------------------------------------------


RAW = "raw ORT"
# minilm_raw's options per candidate; "instances" gets raw_instances(repository).
RAW_SETTINGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "served": {"served": True},
    "served, instances": {"served": True, "instances": None},
}


def inference_table(platform: Edge, repository: Path, args: argparse.Namespace) -> None:
    ours = embedders.narthex(inference_spec("inference", platform.auth.url, repository))
    servers = [ours, *embedders.peers(repository)]
    with running([s.spec for s in servers], platform.directory, timeout=180) as services:
        urls = {s.name: svc.url + s.path for s, svc in zip(servers, services, strict=True)}
        by_name = {s.name: s for s in servers}
        token = exchange(platform.auth.url, platform.admin_key)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

        sample = texts(SAMPLE_TEXTS, seed=3)
        vectors: dict[str, list[embedders.Vector]] = {}
        with httpx.Client(timeout=30.0) as client:
            for server in servers:
                got = []
                for text in sample:
                    answer = client.post(
                        urls[server.name], content=server.body(text), headers=headers
                    )
                    if answer.status_code != 200:
                        raise BenchError(
                            f"{server.name}: HTTP {answer.status_code} {answer.text[:300]}"
                        )
                    got.append(server.vector(answer.content))
                vectors[server.name] = got
        print("sanity: every embedding server returns narthex's vectors")
        for server in servers[1:]:
            cosine = embedders.min_cosine(vectors["narthex"], vectors[server.name])
            if cosine <= MIN_COSINE:
                raise BenchError(
                    f"{server.name}: min cosine to narthex {cosine:.6f} <= {MIN_COSINE}"
                )
            print(f"  {server.name}: min cosine to narthex {cosine:.6f}")

        bodies = {s.name: [s.body(t) for t in texts(256, seed=2)] for s in servers}
        for server in servers:  # warm-up, not measured
            wrk_post(urls[server.name], bodies[server.name], token, args.warmup, args.connections)

        # Raw ONNX Runtime takes its turn in the rounds like a server: measured once up
        # front, its rate was of another moment than the servers' on a shared machine
        # (its rate moved 4x within minutes), and the ratio with it.
        raw: dict[tuple[str, int], list[float]] = {}

        def measure(name: str) -> WrkResult:
            if name != RAW:
                return wrk_post(urls[name], bodies[name], token, args.duration, args.connections)
            best = 0.0
            for setting, options in RAW_SETTINGS.items():
                if "instances" in options:
                    options = options | {"instances": raw_instances(repository)}
                for batch, rate in minilm_raw(repository, args.raw_seconds, **options).items():
                    raw.setdefault((setting, batch), []).append(rate)
                    best = max(best, rate)
            return WrkResult(best, 0.0, 0.0, 0, 0, {})

        results = rounds([*urls, RAW], args.rounds, measure)
    raw_means = {key: statistics.mean(rates) for key, rates in raw.items()}
    setting, best_batch = max(raw_means, key=raw_means.__getitem__)
    raw_rate = raw_means[setting, best_batch]
    rows = [Row(name, by_name[name].lacks, runs) for name, runs in results.items() if name != RAW]
    raw_row = Row(
        f"raw ORT b{best_batch}",
        f"in-process, no HTTP, no tokenizing per request, session on {setting}: the ceiling",
        [],
        fixed_rate=raw_rate,
    )
    print(
        f"\ninference: minilm, one text per request, wrk -t1 -c{args.connections}"
        f" -d{args.duration}s x {args.rounds} rounds (mean); raw ORT texts/s, its best"
        " batch and session options (mean of its rounds)"
    )
    ours_runs = results["narthex"]
    ours_rps = statistics.mean(r.rps for r in ours_runs)
    table([*rows, raw_row], "narthex")
    vs_raw = ours_rps / raw_rate
    vs_triton = ours_rps / statistics.mean(r.rps for r in results["pytriton"])
    best_raw_rounds = raw[setting, best_batch]
    per_round = [r.rps / b for r, b in zip(ours_runs, best_raw_rounds, strict=True)]
    print(
        f"narthex / raw ORT best batch: {vs_raw:.3f}x (target >= {INFERENCE_VS_RAW}:"
        f" {verdict(vs_raw >= INFERENCE_VS_RAW)}; per round"
        f" {min(per_round):.2f}-{max(per_round):.2f}); narthex / PyTriton: {vs_triton:.3f}x"
        f" (target >= {INFERENCE_VS_TRITON}: {verdict(vs_triton >= INFERENCE_VS_TRITON)})"
    )
    for name in RAW_SETTINGS:
        print(
            f"raw ORT on {name} per batch size: "
            + ", ".join(f"b{b} {r:.0f}/s" for (s, b), r in raw_means.items() if s == name)
        )


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__)
    parser.add_argument("--only", choices=("edge", "inference"), help="one table only")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the targets")
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured load")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument(
        "--raw-seconds", type=float, default=1.0, help="per raw batch size and round"
    )
    args = parser.parse_args(argv)
    if min(args.rounds, args.duration, args.warmup, args.connections) < 1:
        parser.error("--rounds, --duration, --warmup and --connections must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("error: wrk is not on PATH; install it with: apt-get install wrk", file=sys.stderr)
        return 2
    try:
        with ExitStack() as stack:
            directory = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="narthex-peers-"))
            )
            repository = builtin_repository() if args.only != "edge" else Path()
            platform = stack.enter_context(edge(directory))
            if args.only != "inference":
                edge_table(platform, args)
            if args.only != "edge":
                inference_table(platform, repository, args)
    except (BenchError, RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
