"""Authentication cost at the gateway: pass-through vs JWT vs API key, one run, same upstream."""

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
    HOST,
    PY,
    UPSTREAM,
    BenchError,
    Target,
    WrkResult,
    free_port,
    run_wrk,
    spawn,
    wait_ready,
)
from narthex.auth.service import AuthService
from narthex.auth.settings import AuthSettings
from narthex.auth.signing import SigningKeyRing
from narthex.auth.store import AuthStore, migrate

TARGET_JWT_MS = 0.3
TARGET_KEY_MS = 0.5
PASS = "/v1/status/inference"  # noqa: S105 - a path; public: forwarded without any credential check
AUTHED = "/v1/models"  # scope `inference`: the caller must authenticate


async def make_tenant_key(settings: AuthSettings) -> str:
    """A tenant on the standard plan and its key, written straight into auth's database."""
    await migrate(settings.database_url)
    store = await AuthStore.open(settings.database_url)
    try:
        service = AuthService(
            store, SigningKeyRing(settings.signing_keys_dir, generate=True), settings
        )
        tenant = await service.ensure_tenant("bench", "standard", actor="bench")
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
                    wait_ready(gateway, PASS)
                    token = exchange(gateway.url, key)
                    cases = {
                        "pass-through": (PASS, {}),
                        "JWT": (AUTHED, {"Authorization": f"Bearer {token}"}),
                        "API key": (AUTHED, {"X-API-Key": key}),
                    }
                    for path, headers in cases.values():  # warm: JWKS, key exchange
                        run_wrk(gateway.url + path, 1, 1, headers)
                    print(f"gateway on loopback, wrk -t1, {args.duration}s a run\n")
                    for connections, what in ((1, "latency"), (64, "throughput")):
                        print(f"{what}: {connections} connection(s)")
                        print(
                            f"{'case':<24}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}"
                            f"{'Δp50':>10}{'errors':>8}"
                        )
                        results: dict[str, WrkResult] = {}
                        for label, (path, headers) in cases.items():
                            results[label] = run_wrk(
                                gateway.url + path, args.duration, connections, headers
                            )
                            base = None if label == "pass-through" else results["pass-through"]
                            print(row(label, results[label], base))
                        print()
                        if connections == 1:
                            latency = results
                    jwt_delta = latency["JWT"].p50_ms - latency["pass-through"].p50_ms
                    key_delta = latency["API key"].p50_ms - latency["pass-through"].p50_ms
                    print(f"JWT path adds {jwt_delta:.3f} ms at p50 (target <= {TARGET_JWT_MS})")
                    print(
                        f"API-key path adds {key_delta:.3f} ms at p50 (target <= {TARGET_KEY_MS})"
                    )
                    errors = sum(r.errors for r in latency.values())
                    return 1 if errors else 0
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
