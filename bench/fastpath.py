"""`POST /v1/embeddings` with the fast path against FastAPI's router, A/B interleaved in one run.

Two inference apps over minilm, identical but for the fast path (`narthex.inference.embeddings`;
`embeddings_fast_path` off in one). Rounds alternate between the arms (ABAB, then BABA), so a
neighbour's load falls on both alike; the medians per arm are printed. Not a test: nothing is
asserted.

- default: both apps in this process. Each round sends `--requests` one-text requests,
  `--clients` at a time, straight into one app's ASGI callable (no server, no sockets: what
  both arms share is left out) and reads the loop thread's CPU time (`time.thread_time`)
  around it; ONNX Runtime computes on its own threads, which that clock does not count.
  Logging and GC are set up as `narthex.common.serve` sets them up.
- `--wrk SECONDS`: both as real services (a JWKS served from files), wrk -t1 -c`--clients`
  for SECONDS per round, against raw ONNX Runtime's best batch measured first, as
  `bench.inference` measures it (a).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
from starlette.types import ASGIApp, Message

from bench._loop import new_event_loop
from narthex.common.jwks import JwksCache
from narthex.common.logging import configure_logging
from narthex.common.serve import tune_gc
from narthex.common.tokens import SigningKey, TokenVerifier, issue_token
from narthex.inference.main import create_app
from narthex.inference.routes import InferenceState
from narthex.inference.settings import InferenceSettings
from narthex.testing.lifespan import started
from narthex.testing.models import builtin_repository
from narthex.testing.texts import texts

KEY = SigningKey.generate()


@asynccontextmanager
async def verifier(_: Any) -> AsyncIterator[TokenVerifier]:
    yield TokenVerifier(
        JwksCache.static({"keys": [KEY.public_jwk()]}), issuer="narthex-auth", audience="narthex"
    )


def build(fast: bool) -> Any:
    settings = InferenceSettings(
        model_repository=builtin_repository(["minilm"]),
        models=["minilm"],
        tracing=False,
        embeddings_fast_path=fast,
    )
    return create_app(settings, verifier=verifier)


async def post(app: ASGIApp, headers: list[tuple[bytes, bytes]], body: bytes) -> int:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/embeddings",
        "raw_path": b"/v1/embeddings",
        "query_string": b"",
        "root_path": "",
        "headers": [*headers, (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }
    sent = False
    status = 0

    async def receive() -> Message:
        nonlocal sent
        if sent:
            await asyncio.Event().wait()  # no disconnect while answering
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def round_(
    app: ASGIApp, headers: list[tuple[bytes, bytes]], bodies: list[bytes], n: int, clients: int
) -> tuple[float, float]:
    """Loop CPU (us) and wall time (ms) per request over `n` requests."""
    queue = list(range(n))
    statuses: list[int] = []

    async def client() -> None:
        while queue:
            i = queue.pop()
            statuses.append(await post(app, headers, bodies[i % len(bodies)]))

    cpu, wall = time.thread_time(), time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    if set(statuses) != {200}:
        raise SystemExit(f"not every request answered 200: {sorted(set(statuses))}")
    return cpu / n * 1e6, wall / n * 1e3


async def run(rounds: int, n: int, clients: int) -> None:
    token = issue_token(
        KEY,
        issuer="narthex-auth",
        audience="narthex",
        subject="t_bench",
        plan="standard",
        roles=["tenant"],
        scopes=["inference"],
        ttl=3600,
    )
    headers = [
        (b"host", b"inference"),
        (b"authorization", f"Bearer {token}".encode()),
        (b"content-type", b"application/json"),
    ]
    bodies = [orjson.dumps({"model": "minilm", "input": t}) for t in texts(256, seed=2)]
    async with AsyncExitStack() as stack:
        arms = {
            label: (await stack.enter_async_context(started(build(fast), InferenceState))).app
            for label, fast in (("router", False), ("fast path", True))
        }
        for app in arms.values():  # warm-up, not measured
            await round_(app, headers, bodies, min(n, 200), clients)
        cpu: dict[str, list[float]] = {label: [] for label in arms}
        wall: dict[str, list[float]] = {label: [] for label in arms}
        for r in range(rounds):
            # ABAB..., then BABA...: neither arm always goes first.
            order = list(arms) if r % 2 == 0 else list(reversed(arms))
            for label in order:
                us, ms = await round_(arms[label], headers, bodies, n, clients)
                cpu[label].append(us)
                wall[label].append(ms)
                print(
                    f"  round {r + 1} {label:<10} loop CPU {us:7.1f} us/req  wall {ms:6.3f} ms/req"
                )
    print(f"\nmedians over {rounds} rounds of {n} requests, {clients} at a time")
    for label in arms:
        print(
            f"  {label:<10} loop CPU {statistics.median(cpu[label]):7.1f} us/request,"
            f" {1000 / statistics.median(wall[label]):7.0f} requests/s in-process"
        )
    saved = statistics.median(cpu["router"]) - statistics.median(cpu["fast path"])
    print(f"  the fast path saves {saved:.1f} us of loop CPU per request")


def over_wrk(rounds: int, seconds: int, clients: int) -> None:
    # Imported here: bench.inference brings the fraud model's training stack (seconds).
    from bench.inference import minilm_raw, raw_instances
    from bench.proxy import signing_keys, wrk_post
    from narthex.testing.platform import inference_spec, running

    repository = builtin_repository(["minilm"])
    print("raw ONNX Runtime, 1 s per batch size ...", flush=True)
    raw = max(
        max(minilm_raw(repository, 1.0).values()),
        max(minilm_raw(repository, 1.0, served=True).values()),
        max(minilm_raw(repository, 1.0, served=True, instances=raw_instances(repository)).values()),
    )
    bodies = [orjson.dumps({"model": "minilm", "input": t}) for t in texts(256, seed=2)]
    with tempfile.TemporaryDirectory(prefix="narthex-fastpath-") as tmp:
        directory = Path(tmp)
        with signing_keys(directory / "keys") as keys:
            specs = [
                inference_spec(f"inference-{label}", keys.url, repository, **env)
                for label, env in (
                    ("router", {"embeddings_fast_path": "false", "models": "minilm"}),
                    ("fast", {"models": "minilm"}),
                )
            ]
            with running(specs, directory, timeout=120) as services:
                urls = {
                    "router": services[0].url + "/v1/embeddings",
                    "fast path": services[1].url + "/v1/embeddings",
                }
                for url in urls.values():  # warm-up, not measured
                    wrk_post(url, bodies, keys.token, 2, clients)
                rates: dict[str, list[float]] = {label: [] for label in urls}
                for r in range(rounds):
                    order = list(urls) if r % 2 == 0 else list(reversed(urls))
                    for label in order:
                        result = wrk_post(urls[label], bodies, keys.token, seconds, clients)
                        rates[label].append(result.rps)
                        print(
                            f"  round {r + 1} {label:<10} {result.rps:7.0f} req/s"
                            f"  p99 {result.p99_ms:6.1f} ms  ({result.rps / raw:.2f}x raw)",
                            flush=True,
                        )
    print(f"\nraw ONNX Runtime best batch: {raw:.0f} texts/s")
    for label, values in rates.items():
        rate = statistics.median(values)
        print(f"  {label:<10} median {rate:7.0f} req/s = {rate / raw:.2f}x raw")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fastpath", description=__doc__)
    parser.add_argument("--rounds", type=int, default=6, help="rounds per arm")
    parser.add_argument("--requests", type=int, default=800, help="requests per round")
    parser.add_argument("--clients", type=int, default=64, help="requests in flight")
    parser.add_argument(
        "--wrk", type=int, metavar="SECONDS", help="real services under wrk, SECONDS per round"
    )
    args = parser.parse_args(argv)
    if args.wrk:
        over_wrk(args.rounds, args.wrk, args.clients)
        return 0
    # As narthex.common.serve sets up a service: the access log is part of each request's cost.
    configure_logging("inference", level="INFO", json=True)
    tune_gc()
    loop = new_event_loop()
    try:
        loop.run_until_complete(run(args.rounds, args.requests, args.clients))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
