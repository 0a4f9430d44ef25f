"""Reverse-proxy pass-through benchmark: wrk against each target, ratios against a bare baseline."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from narthex.testing import processes
from narthex.testing.processes import HOST, NotReady, Service, Spec, free_port

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
THREADS = 1  # one wrk thread: the box has 2 cores shared by wrk, the proxy and the upstream
RATIO_TARGET = 0.80
DRIFT_WARN = 0.10
BASELINE = "baseline"


@dataclass(frozen=True)
class Target:
    """How to start one proxy; ``{upstream_url}``, ``{keys_url}`` and ``{port}`` are
    substituted in argv/env."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    # A route every target forwards to the trivial upstream (which answers every path
    # alike). For the gateway it is a proxied route with a credential check: its public
    # routes answer from cached state, without an upstream call, since nothing a client
    # sends there may cost the upstreams anything. The caller's JWT is verified once and
    # then found in the gateway's token cache, as a client's repeated token would be.
    path: str = "/v1/admin/models"


def _naive(app: str, client: str) -> Target:
    argv = (PY, "-m", "bench.naive", "--app", app, "--client", client)
    return Target((*argv, "--upstream", "{upstream_url}", "--port", "{port}"))


# Add a target here: a name, the command line and env; every process must stay single-worker.
TARGETS: dict[str, Target] = {
    BASELINE: Target(
        (PY, "-m", "bench.baseline", "--upstream", "{upstream_url}", "--port", "{port}")
    ),
    "gateway": Target(
        (PY, "-m", "narthex.gateway"),
        env={
            "NARTHEX_GATEWAY_HOST": HOST,
            "NARTHEX_GATEWAY_PORT": "{port}",
            "NARTHEX_GATEWAY_ENV": "dev",
            "NARTHEX_GATEWAY_AUTH_URL": "{keys_url}",
            "NARTHEX_GATEWAY_FEATURES_URL": "{upstream_url}",
            "NARTHEX_GATEWAY_INFERENCE_URL": "{upstream_url}",
            "NARTHEX_GATEWAY_ANALYTICS_URL": "{upstream_url}",
        },
    ),
    "fastapi-httpx": _naive("fastapi", "httpx"),
    "fastapi-aiohttp": _naive("fastapi", "aiohttp"),
    "asgi-aiohttp": _naive("asgi", "aiohttp"),
}
UPSTREAM = Target((PY, "-m", "bench.upstream", "--host", HOST, "--port", "{port}"))
# What the gateway needs from auth to check a token: the signing keys (and an empty list of
# revocations), as static files. Python's own file server: it answers a handful of calls.
KEYS = Target((PY, "-m", "http.server", "--bind", HOST, "--directory", "{keys_dir}", "{port}"))


class BenchError(Exception):
    """A failure that ends the run with a non-zero exit status."""


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: dict[str, int]

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())


@dataclass(frozen=True)
class Run:
    label: str
    target: str
    result: WrkResult


# --- processes: narthex.testing's launcher ----------------------------------------------------


@contextmanager
def spawn(
    name: str, target: Target, port: int, upstream_url: str = "", **more: str
) -> Iterator[Service]:
    """Start a target process and always stop it on exit (TERM, then KILL after a grace period)."""
    subs = {"port": "{port}", "upstream_url": upstream_url, "keys_url": "", **more}
    spec = Spec(
        name,
        tuple(a.format(**subs) for a in target.argv),
        {k: v.format(**subs) for k, v in target.env.items()},
    )
    with tempfile.TemporaryDirectory(prefix=f"narthex-bench-{name}-") as logs:
        server = processes.start(spec, Path(logs), port=port, cwd=ROOT)
        try:
            yield server
        finally:
            processes.stop(server.process, STOP_TIMEOUT_S)


def wait_ready(server: Service, path: str) -> None:
    """Poll with a plain GET until it answers 200; fail fast if the process dies."""
    try:
        processes.wait_ready(server, READY_TIMEOUT_S, path)
    except NotReady as exc:
        raise BenchError(str(exc)) from exc


def check_alive(server: Service) -> None:
    if (error := server.exited()) is not None:
        raise BenchError(str(error))


# --- wrk -----------------------------------------------------------------------------------------

_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_REQUESTS = re.compile(r"^\s*(\d+) requests in ", re.M)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def _percentile_ms(output: str, pct: int) -> float:
    match = re.search(rf"^\s*{pct}(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.M)
    if match is None:
        raise BenchError(f"no {pct}% latency in wrk output:\n{output}")
    return float(match[1]) * _UNIT_MS[match[2]]


def parse_wrk(output: str) -> WrkResult:
    rps, requests = _RPS.search(output), _REQUESTS.search(output)
    if rps is None or requests is None:
        raise BenchError(f"cannot parse wrk output:\n{output}")
    non_2xx = _NON_2XX.search(output)
    sock = _SOCKET.search(output)
    kinds = ("connect", "read", "write", "timeout")
    return WrkResult(
        rps=float(rps[1]),
        p50_ms=_percentile_ms(output, 50),
        p99_ms=_percentile_ms(output, 99),
        requests=int(requests[1]),
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors={k: int(sock[i + 1]) if sock else 0 for i, k in enumerate(kinds)},
    )


def run_wrk(
    url: str,
    duration_s: int,
    connections: int,
    headers: Mapping[str, str] | None = None,
    *,
    script: Path | None = None,
    request_timeout: str = "5s",
) -> WrkResult:
    """One wrk run; `script` is a Lua file that shapes the requests (POST bodies, say)."""
    argv = ["wrk", f"-t{THREADS}", f"-c{connections}", f"-d{duration_s}s", "--latency"]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    if script is not None:
        argv += ["-s", str(script)]
    argv += ["--timeout", request_timeout, url]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=duration_s + 30, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish: {' '.join(argv)}") from exc
    if done.returncode != 0:
        raise BenchError(f"wrk exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return parse_wrk(done.stdout)


def wrk_post(
    url: str, bodies: Sequence[bytes], token: str, seconds: int, connections: int
) -> WrkResult:
    """wrk POSTing `bodies` round robin as JSON with the token."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        quoted = ",\n".join("[==[" + b.decode() + "]==]" for b in bodies)
        script.write(
            'wrk.method = "POST"\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
            f'wrk.headers["Authorization"] = "Bearer {token}"\n'
            f"local bodies = {{\n{quoted}\n}}\n"
            "local i = 0\n"
            "request = function()\n"
            "  i = i + 1\n"
            "  return wrk.format(nil, nil, nil, bodies[(i % #bodies) + 1])\n"
            "end\n"
        )
    try:
        result = run_wrk(url, seconds, connections, script=Path(script.name), request_timeout="10s")
    finally:
        Path(script.name).unlink(missing_ok=True)
    if result.errors:
        raise BenchError(f"{result.errors} failed requests against {url}: {result}")
    return result


# --- driver ----------------------------------------------------------------------------------


def plan(names: Sequence[str]) -> list[tuple[str, str]]:
    """(label, target) in run order: baseline first and last, so drift shows and averages out."""
    others = [n for n in names if n != BASELINE]
    if BASELINE not in names:
        return [(n, n) for n in others]
    return [(f"{BASELINE}#1", BASELINE), *((n, n) for n in others), (f"{BASELINE}#2", BASELINE)]


@dataclass(frozen=True)
class Keys:
    """A signing key's JWKS served over HTTP, and an admin token it signed."""

    url: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@contextmanager
def signing_keys(directory: Path) -> Iterator[Keys]:
    # Imported here: the other benchmarks that import this module need none of it.
    from narthex.common import scopes
    from narthex.common.tokens import SigningKey, issue_token

    key = SigningKey.generate()
    files = {
        ".well-known/jwks.json": {"keys": [key.public_jwk()]},
        "internal/v1/revocations": {"keys": [], "tenants": [], "window_seconds": 990},
        "readyz": {"status": "ready"},
    }
    for name, document in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document))
    token = issue_token(
        key,
        issuer="narthex-auth",
        audience="narthex",
        subject="t_bench",
        plan="enterprise",
        roles=[scopes.ADMIN],
        scopes=scopes.scopes_for({scopes.ADMIN}),
        ttl=3600,
    )
    with spawn("keys", KEYS, free_port(), keys_dir=str(directory)) as server:
        wait_ready(server, "/.well-known/jwks.json")
        yield Keys(server.url, token)


def bench_target(
    label: str, name: str, upstream: Service, keys: Keys, args: argparse.Namespace
) -> WrkResult:
    target = TARGETS[name]
    check_alive(upstream)
    with spawn(name, target, free_port(), upstream.url, keys_url=keys.url) as server:
        wait_ready(server, "/healthz" if name == "gateway" else target.path)
        url = server.url + target.path
        print(f"[{label}] {' '.join(target.argv)} -> {url}", file=sys.stderr, flush=True)
        run_wrk(url, args.warmup, args.connections, keys.headers)
        result = run_wrk(url, args.duration, args.connections, keys.headers)
        check_alive(server)
    return result


def _row(label: str, rps: float, p50: float, p99: float, errors: str) -> str:
    return f"{label:<18}{rps:>12.1f}{p50:>10.2f}{p99:>10.2f}{errors:>10}"


def report(runs: Sequence[Run]) -> dict[str, Any]:
    """Print the table and ratios; return the same numbers for --json."""
    print(f"{'target':<18}{'req/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'errors':>10}")
    for run in runs:
        r = run.result
        print(_row(run.label, r.rps, r.p50_ms, r.p99_ms, str(r.errors)))
    base = [run.result for run in runs if run.target == BASELINE]
    summary: dict[str, Any] = {"runs": [{**asdict(r), "errors": r.result.errors} for r in runs]}
    if not base:
        return summary
    mean = {k: sum(getattr(r, k) for r in base) / len(base) for k in ("rps", "p50_ms", "p99_ms")}
    print(_row(f"{BASELINE} (mean)", mean["rps"], mean["p50_ms"], mean["p99_ms"], "-"))
    if len(base) == 2:
        drift = (base[1].rps - base[0].rps) / base[0].rps
        print(f"baseline drift between runs: {drift:+.1%}")
        if abs(drift) > DRIFT_WARN:
            # Big drift means something else took CPU mid-run; every ratio is suspect then.
            print(f"warning: baseline drift above {DRIFT_WARN:.0%}; the box was busy, rerun")
    ratios = {run.target: run.result.rps / mean["rps"] for run in runs if run.target != BASELINE}
    print()
    for name, ratio in ratios.items():
        print(f"{name}/{BASELINE} throughput ratio: {ratio:.2f} (target >= {RATIO_TARGET:.2f})")
    return {**summary, "baseline_mean": mean, "throughput_ratios": ratios}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.proxy", description=__doc__)
    parser.add_argument(
        "--targets",
        default=f"{BASELINE},gateway",
        help=f"comma-separated, from: {', '.join(TARGETS)} (default: %(default)s)",
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured load first")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        parser.error(f"unknown targets {unknown}; choose from {', '.join(TARGETS)}")
    if args.duration < 1 or args.warmup < 1 or args.connections < 1:
        parser.error("--duration, --warmup and --connections must be >= 1")
    args.names = list(dict.fromkeys(names))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("error: wrk is not on PATH; install it with: apt-get install wrk", file=sys.stderr)
        return 2
    runs: list[Run] = []
    try:
        with (
            tempfile.TemporaryDirectory(prefix="narthex-bench-keys-") as keys_dir,
            signing_keys(Path(keys_dir)) as keys,
            spawn("upstream", UPSTREAM, free_port()) as upstream,
        ):
            wait_ready(upstream, "/v1/echo")
            for label, name in plan(args.names):
                runs.append(Run(label, name, bench_target(label, name, upstream, keys, args)))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"\nwrk -t{THREADS} -c{args.connections} -d{args.duration}s (warm-up {args.warmup}s), "
        f"{os.cpu_count()} CPUs, loopback\n"
    )
    summary = report(runs)
    failed = [run for run in runs if run.result.errors]
    for run in failed:
        r = run.result
        print(f"ERRORS in {run.label}: non-2xx {r.non_2xx}, socket {r.socket_errors}")
    if args.json is not None:
        config = {k: getattr(args, k) for k in ("duration", "warmup", "connections", "names")}
        summary = {"config": {**config, "threads": THREADS}, **summary}
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
