"""The whole edge, A against B in one run: a change's ratio, or two gateway processes against one.

`python -m bench.peers.ab --base REV`: the gateway as committed at REV (its packages exported
with `git archive` and put first on PYTHONPATH) against the working tree, and optionally
different settings per side (`--env-a`, `--env-b`), both running at once behind the same
auth, upstream and Redis, timed in alternating rounds (A B, B A, ...) with wrk -t1 -c64 on
`GET /v1/models` with the same JWT. Prints each side's mean req/s and B / A.

`python -m bench.peers.ab --scale`: one gateway process under one wrk (-c64) against two
processes of the same gateway, each under its own wrk (-c32), their rates added; the two
share the machine's cores with wrk, the upstream and Redis, as they would on one host.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.limits import gateway_env, private_prefix
from bench.peers.edges import PATH, cpu_seconds, unlimited_token
from bench.proxy import ROOT, BenchError, WrkResult, run_wrk
from narthex.testing.platform import edge, running
from narthex.testing.processes import Service

# The packages a gateway process imports from this repository.
PACKAGES = ("libs/common/src", "gateway/src")


def export(rev: str, directory: Path) -> str:
    """REV's gateway packages under `directory`; the PYTHONPATH that puts them first."""
    archive = subprocess.run(
        ["git", "archive", rev, *PACKAGES], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    return os.pathsep.join(str(directory / p) for p in PACKAGES)


def _env(pairs: Sequence[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--env-a/--env-b take NAME=VALUE, not {pair!r}")
        out[name.removeprefix("NARTHEX_GATEWAY_").lower()] = value
    return out


def _alternate(
    count: int,
    sides: Mapping[str, Sequence[Service]],
    seconds: int,
    connections: int,
    jwt: dict[str, str],
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Rounds alternating the sides' order; a side of several gateways runs one wrk per
    gateway at once (connections split between them) and counts their rates together.
    Returns each side's rates per round and its gateways' CPU microseconds per request."""
    names = list(sides)
    rates: dict[str, list[float]] = {name: [] for name in names}
    cpu = dict.fromkeys(names, 0.0)
    served = dict.fromkeys(names, 0)
    for n in range(count):
        for name in names if n % 2 == 0 else names[::-1]:
            gateways = sides[name]
            share = max(1, connections // len(gateways))
            before = sum(cpu_seconds(g.process.pid) for g in gateways)
            with ThreadPoolExecutor(len(gateways)) as pool:
                runs: list[WrkResult] = list(
                    pool.map(lambda g, c=share: run_wrk(g.url + PATH, seconds, c, jwt), gateways)
                )
            cpu[name] += sum(cpu_seconds(g.process.pid) for g in gateways) - before
            served[name] += sum(r.requests for r in runs)
            if any(r.errors for r in runs):
                raise BenchError(f"{name}: failed requests: {runs}")
            rates[name].append(sum(r.rps for r in runs))
            print(f"  round {n + 1} {name:<28} {rates[name][-1]:>9.1f} req/s", file=sys.stderr)
    return rates, {name: 1e6 * cpu[name] / served[name] for name in names}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.ab", description=__doc__)
    parser.add_argument("--base", default="HEAD", help="git revision of side A (default HEAD)")
    parser.add_argument("--env-a", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--env-b", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--scale", action="store_true", help="1 process against 2 instead")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args(argv)
    try:
        with (
            tempfile.TemporaryDirectory(prefix="narthex-ab-") as tmp,
            edge(Path(tmp)) as platform,
            private_prefix() as prefix,
        ):
            shared = gateway_env(prefix, 2 if args.scale else 1)
            if args.scale:
                specs = [platform.gateway(f"gateway-{i}", **shared) for i in range(3)]
            else:
                base = Path(tmp) / "base"
                base.mkdir()
                path = export(args.base, base)
                specs = [
                    platform.gateway("a", **shared, **_env(args.env_a)),
                    platform.gateway("b", **shared, **_env(args.env_b)),
                ]
                specs[0] = specs[0].__class__(
                    specs[0].label, specs[0].argv, {**specs[0].env, "PYTHONPATH": path}
                )
            with running(specs, platform.directory) as gateways:
                token = unlimited_token(platform, gateways[0].url)
                jwt = {"Authorization": f"Bearer {token}"}
                for gw in gateways:  # JWKS, plan cache, Redis script, connections
                    run_wrk(gw.url + PATH, 2, args.connections, jwt)
                if args.scale:
                    sides = {
                        "1 process, wrk -c64": gateways[:1],
                        "2 processes, 2 wrk -c32": gateways[1:],
                    }
                else:
                    sides = {
                        f"A: {args.base} {' '.join(args.env_a)}".strip(): gateways[:1],
                        f"B: work tree {' '.join(args.env_b)}".strip(): gateways[1:],
                    }
                rates, cpu_us = _alternate(args.rounds, sides, args.duration, args.connections, jwt)
    except (BenchError, RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    a_rates, b_rates = rates.values()
    print(f"\nwhole edge, GET {PATH}, wrk -t1, {args.duration}s x {args.rounds} rounds")
    for name, values in rates.items():
        print(
            f"  {name:<40} {statistics.mean(values):>9.1f} req/s  {cpu_us[name]:>6.0f} CPU us/req"
            "  rounds: " + ", ".join(f"{v:.0f}" for v in values)
        )
    cpu_a, cpu_b = cpu_us.values()
    print(f"CPU per request, A / B: {cpu_a / cpu_b:.3f} (above 1: B spends less per request)")
    per_round = [y / x for x, y in zip(a_rates, b_rates, strict=True)]
    print(
        f"B / A: {statistics.mean(b_rates) / statistics.mean(a_rates):.3f}"
        f" (per round: {', '.join(f'{r:.3f}' for r in per_round)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
