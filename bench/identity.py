"""Authentication cost at the gateway: JWT vs API key, beside the gateway's own no-credential
answer and the upstream alone, one run, same upstream.

No public route is forwarded without a credential check any more (the status route answers
from the gateway's cache), so the JWT row carries the proxy hop as well as the check; the
API-key path is measured against the JWT path, which differs from it only in the check."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from bench.proxy import (
    PY,
    UPSTREAM,
    BenchError,
    Target,
    WrkResult,
    run_wrk,
    spawn,
    wait_ready,
)
from narthex.auth.database import migrate
from narthex.auth.service import AuthService
from narthex.auth.settings import AuthSettings
from narthex.auth.signing import SigningKeyRing
from narthex.auth.store import AuthStore
from narthex.testing.processes import HOST, free_port

# The API-key path over the JWT path: one cached key lookup (the exchange is cached).
TARGET_KEY_OVER_JWT_MS = 0.2
LOCAL = "/v1/status/inference"  # public, answered from the gateway's cache: no credential, no hop
AUTHED = "/v1/models"  # scope `inference`: the caller must authenticate


async def make_tenant_key(settings: AuthSettings) -> str:
    """A tenant on a plan too large to limit the run, and its key, written straight into
    auth's database: the limiter still runs on every request, it just never refuses."""
    await migrate(settings.database_url)
    store = await AuthStore.open(settings.database_url)
    try:
        service = AuthService(
            store, SigningKeyRing(settings.signing_keys_dir, generate=True), settings
        )
        await service.create_plan(
            "bench",
            name="bench-unlimited",
            rate_per_second=100_000.0,
            burst=1_000_000,
            daily_quota=2_000_000_000,
            max_items_per_request=100,
        )
        tenant = await service.ensure_tenant("bench", "bench-unlimited", actor="bench")
        key, _ = await service.create_key(tenant.id, "bench", None, actor="bench")
        return str(key)
    finally:
        await store.close()


def exchange(gateway_url: str, key: str) -> str:
    request = urllib.request.Request(  # noqa: S310 - a loopback http URL we built
        gateway_url + "/v1/auth/token", method="POST", headers={"X-API-Key": key}
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback URL
        token: str = json.load(response)["access_token"]
        return token


def row(label: str, result: WrkResult, base: WrkResult | None) -> str:
    """One table line; Δp50 against the row above it."""
    delta = "" if base is None else f"{result.p50_ms - base.p50_ms:+8.3f}"
    return (
        f"{label:<24}{result.rps:>10.1f}{result.p50_ms:>10.3f}{result.p99_ms:>10.3f}"
        f"{delta:>10}{result.errors:>8}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=6, help="seconds per wrk run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="narthex-bench-") as tmp:
        state = Path(tmp)
        settings = AuthSettings(
            env="dev",
            database_url=f"sqlite+aiosqlite:///{state}/auth.db",
            signing_keys_dir=state / "keys",
        )
        key = asyncio.run(make_tenant_key(settings))
        auth_target = Target(
            (PY, "-m", "narthex.auth"),
            env={
                "NARTHEX_AUTH_HOST": HOST,
                "NARTHEX_AUTH_PORT": "{port}",
                "NARTHEX_AUTH_ENV": "dev",
                "NARTHEX_AUTH_DATABASE_URL": settings.database_url,
                "NARTHEX_AUTH_SIGNING_KEYS_DIR": str(settings.signing_keys_dir),
            },
        )
        try:
            with (
                spawn("upstream", UPSTREAM, free_port()) as upstream,
                spawn("auth", auth_target, free_port()) as auth,
            ):
                wait_ready(upstream, "/")
                wait_ready(auth, "/readyz")
                gateway_target = Target(
                    (PY, "-m", "narthex.gateway"),
                    env={
                        "NARTHEX_GATEWAY_HOST": HOST,
                        "NARTHEX_GATEWAY_PORT": "{port}",
                        "NARTHEX_GATEWAY_ENV": "dev",
                        "NARTHEX_GATEWAY_AUTH_URL": auth.url,
                        **{
                            f"NARTHEX_GATEWAY_{name}_URL": upstream.url
                            for name in ("FEATURES", "INFERENCE", "ANALYTICS")
                        },
                    },
                )
                with spawn("gateway", gateway_target, free_port()) as gateway:
                    wait_ready(gateway, LOCAL)
                    token = exchange(gateway.url, key)
                    cases = {
                        "upstream alone": (upstream.url + AUTHED, {}),
                        "gateway, no credential": (gateway.url + LOCAL, {}),
                        "JWT, proxied": (
                            gateway.url + AUTHED,
                            {"Authorization": f"Bearer {token}"},
                        ),
                        "API key, proxied": (gateway.url + AUTHED, {"X-API-Key": key}),
                    }
                    for url, headers in cases.values():  # warm: JWKS, key exchange
                        run_wrk(url, 1, 1, headers)
                    print(f"gateway on loopback, wrk -t1, {args.duration}s a run\n")
                    for connections, what in ((1, "latency"), (64, "throughput")):
                        print(f"{what}: {connections} connection(s)")
                        print(
                            f"{'case':<24}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}"
                            f"{'Δp50':>10}{'errors':>8}"
                        )
                        results: dict[str, WrkResult] = {}
                        base: WrkResult | None = None
                        for label, (url, headers) in cases.items():
                            results[label] = run_wrk(url, args.duration, connections, headers)
                            print(row(label, results[label], base))
                            base = results[label]
                        print()
                        if connections == 1:
                            latency = results
                    edge = latency["JWT, proxied"].p50_ms - latency["upstream alone"].p50_ms
                    key_delta = latency["API key, proxied"].p50_ms - latency["JWT, proxied"].p50_ms
                    print(f"the whole JWT edge adds {edge:.3f} ms at p50 over the upstream alone")
                    print(
                        f"the API-key path adds {key_delta:.3f} ms at p50 over the JWT path "
                        f"(target <= {TARGET_KEY_OVER_JWT_MS})"
                    )
                    errors = sum(r.errors for r in latency.values())
                    return 1 if errors else 0
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
