"""Inference throughput, measured in one run: raw ONNX Runtime, the service batching, unbatched.

For `minilm` (64 concurrent clients, one ~16-token text per request):
  (a) raw, in this process: the session alone on pre-tokenized batches of each size in
      BATCH_SIZES, on ONNX Runtime's defaults, on the service's session options, and so
      with runners on the one session as a version's instances run; the best texts/s is
      the ceiling the service is measured against.
  (b) the service (`POST /v1/embeddings` with a JWT), dynamic batching as configured.
  (c) the same service over a repository whose only change is `max_batch_size: 1`.
  Targets (CPU): (b) >= 0.85 x (a), (b) >= 1.3 x (c); p99 of (b) printed.
For `fraud` (v2, one instance per request): the same three, plus the service's overhead per
request: its p50 at 1 connection minus one raw `run()` at batch 1.

Load comes from wrk (one thread, a Lua script POSTing JSON) on 127.0.0.1; the service,
wrk and this process share the machine's cores, as they would on one host. Everything
stops by itself. The built-in models are built first if missing (`narthex models build`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
from ruamel.yaml import YAML

from bench.proxy import WrkResult, wrk_post
from narthex.inference.builtin import fraud
from narthex.inference.repository import CONFIG_FILE, Repository
from narthex.inference.runtime import Session, intra_op_threads
from narthex.inference.text import TextEncoder
from narthex.testing.models import builtin_repository
from narthex.testing.platform import edge, exchange, inference_spec, running
from narthex.testing.texts import texts

BATCH_SIZES = (1, 8, 16, 32, 64)
CLIENTS = 64
TARGET_VS_RAW = 0.85
TARGET_VS_UNBATCHED = 1.3


def raw_throughput(
    run: Callable[[int], None], seconds: float, *, runners: int = 1
) -> dict[int, float]:
    """Items/s of `run(batch)` per batch size, each for about `seconds`, by `runners`
    threads calling it at once (a version's instances)."""
    rates: dict[int, float] = {}
    for batch in BATCH_SIZES:
        run(batch)  # warm this shape
        started = time.perf_counter()

        def runner(_: int, batch: int = batch, started: float = started) -> int:
            done = 0
            while time.perf_counter() - started < seconds:
                run(batch)
                done += batch
            return done

        if runners == 1:
            done = runner(0)
        else:
            with ThreadPoolExecutor(runners) as pool:
                done = sum(pool.map(runner, range(runners)))
        rates[batch] = done / (time.perf_counter() - started)
    return rates


def raw_session(path: Path) -> ort.InferenceSession:
    """ONNX Runtime on its defaults (threads spinning between runs, as a benchmark likes
    best), not the service's settings: the baseline is the session at its fastest."""
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def minilm_raw(
    repository: Path, seconds: float, *, served: bool = False, instances: int = 1
) -> dict[int, float]:
    """Texts/s per batch size of minilm's session on ONNX Runtime's defaults, or (`served`)
    with the very options the service opens it with (its threads asleep between runs),
    which win on a busy machine where spinning threads lose their cores; served, by
    `instances` runners at once on the one session, each run on the threads the service
    gives it."""
    directory = Repository(repository).version_dir("minilm", 1)
    path = directory / "model.onnx"
    run_feeds: Callable[[dict[str, np.ndarray[Any, Any]]], object]
    if served:
        threads = intra_op_threads(0, instances)
        served_session = Session(path, provider="cpu", intra_op_threads=threads)
        run_feeds, inputs = served_session.run, list(served_session.inputs)
    else:
        session = raw_session(path)
        run_feeds, inputs = partial(session.run, None), [i.name for i in session.get_inputs()]
    encoder = TextEncoder(
        directory / "tokenizer.json", max_tokens=256, truncate=True, graph_inputs=inputs
    )
    pool = encoder.encode(texts(256))

    def run(batch: int) -> None:
        start = int(time.perf_counter_ns()) % (len(pool) - batch)
        run_feeds(encoder.collate(pool[start : start + batch]))

    return raw_throughput(run, seconds, runners=instances)


def raw_instances(repository: Path) -> int:
    """Runners of the raw candidate laid out as a served version with instances: minilm's
    configured count, or 2 where it has one (parallel runs can beat parallel threads in
    one run; raw's best is then the stricter ceiling)."""
    return max(2, Repository(repository).config("minilm").instances)


def fraud_raw(rows: np.ndarray[Any, Any], repository: Path, seconds: float) -> dict[int, float]:
    session = raw_session(Repository(repository).version_dir("fraud", 2) / "model.onnx")

    def run(batch: int) -> None:
        session.run(None, {"features": rows[:batch]})

    return raw_throughput(run, seconds)


@contextmanager
def unbatched_copy(repository: Path, directory: Path) -> Iterator[Path]:
    """The repository again, `max_batch_size: 1` for every model; files are symlinks."""
    root = directory / "unbatched"
    yaml = YAML(typ="safe")
    for model in ("fraud", "minilm"):
        (root / model).mkdir(parents=True)
        config = yaml.load((repository / model / CONFIG_FILE).read_text())
        config["max_batch_size"] = 1
        config["dynamic_batching"]["preferred_batch_sizes"] = []
        with (root / model / CONFIG_FILE).open("w") as out:
            yaml.dump(config, out)
        for version in Repository(repository).versions_on_disk(model):
            (root / model / str(version)).symlink_to(repository / model / str(version))
    yield root


def row(label: str, rate: float, unit: str, p50: str = "", p99: str = "") -> str:
    return f"{label:<52} {rate:>9.0f} {unit:<8} {p50:>9} {p99:>9}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inference", description=__doc__)
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--raw-seconds", type=float, default=3.0, help="per raw batch size")
    args = parser.parse_args(argv)

    print("building the built-in models if missing ...", flush=True)
    repository = builtin_repository()
    training = fraud.train()
    rows = training.holdout.inputs.astype(np.float32)
    instances = [orjson.dumps({"instances": [r.tolist()]}) for r in rows[:256]]
    embeddings = [orjson.dumps({"model": "minilm", "input": t}) for t in texts(256, seed=2)]

    print(f"\n(a) raw ONNX Runtime in this process ({args.raw_seconds:g} s per batch size)")
    # The better of ONNX Runtime's defaults and the service's own session options, per size.
    on_defaults = minilm_raw(repository, args.raw_seconds)
    as_served = minilm_raw(repository, args.raw_seconds, served=True)
    runners = minilm_raw(
        repository, args.raw_seconds, served=True, instances=raw_instances(repository)
    )
    raw_text = {
        batch: max(on_defaults[batch], as_served[batch], runners[batch]) for batch in BATCH_SIZES
    }
    raw_fraud = fraud_raw(rows, repository, args.raw_seconds)
    for batch in BATCH_SIZES:
        print(
            f"  batch {batch:>3}: minilm {raw_text[batch]:8.0f} texts/s"
            f"   fraud {raw_fraud[batch]:10.0f} rows/s"
        )
    best_text = max(raw_text.values())
    best_fraud = max(raw_fraud.values())
    fraud_run_us = 1e6 / raw_fraud[1]

    results: dict[str, WrkResult] = {}
    latency_1: dict[str, WrkResult] = {}
    with tempfile.TemporaryDirectory(prefix="narthex-bench-") as tmp:
        directory = Path(tmp)
        with edge(directory) as platform, unbatched_copy(repository, directory) as unbatched:
            for label, repo in (("batched", repository), ("unbatched", unbatched)):
                spec = inference_spec(f"inference-{label}", platform.auth.url, repo)
                with running([spec], directory, timeout=120) as (service,):
                    token = exchange(platform.auth.url, platform.admin_key)
                    for model, path, bodies in (
                        ("minilm", "/v1/embeddings", embeddings),
                        ("fraud", "/v1/models/fraud/predict", instances),
                    ):
                        url = service.url + path
                        wrk_post(url, bodies, token, 2, CLIENTS)  # warm-up, not measured
                        results[f"{model}-{label}"] = wrk_post(
                            url, bodies, token, args.duration, CLIENTS
                        )
                        if model == "fraud" and label == "batched":
                            latency_1[model] = wrk_post(url, bodies, token, args.duration, 1)

    print(f"\n(b), (c) the service, wrk -t1 -c{CLIENTS}, one item per request")
    print(f"{'case':<52} {'rate':>9} {'':<8} {'p50 ms':>9} {'p99 ms':>9}")
    for key, result in results.items():
        print(row(key, result.rps, "req/s", f"{result.p50_ms:.2f}", f"{result.p99_ms:.2f}"))

    text_b, text_c = results["minilm-batched"], results["minilm-unbatched"]
    fraud_b, fraud_c = results["fraud-batched"], results["fraud-unbatched"]
    overhead_ms = latency_1["fraud"].p50_ms - fraud_run_us / 1000
    vs_raw = text_b.rps / best_text
    vs_unbatched = text_b.rps / text_c.rps

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    print("\nsummary")
    print(
        f"  minilm: (a) raw best {best_text:.0f} texts/s (batch"
        f" {max(raw_text, key=raw_text.__getitem__)}); (b) service {text_b.rps:.0f}/s,"
        f" p99 {text_b.p99_ms:.1f} ms; (c) max_batch_size 1 {text_c.rps:.0f}/s"
    )
    print(
        f"  minilm: (b)/(a) = {vs_raw:.2f}x"
        f" (target >= {TARGET_VS_RAW}: {verdict(vs_raw >= TARGET_VS_RAW)});"
        f" (b)/(c) = {vs_unbatched:.2f}x (target >= {TARGET_VS_UNBATCHED}:"
        f" {verdict(vs_unbatched >= TARGET_VS_UNBATCHED)})"
    )
    print(
        f"  fraud:  (a) raw best {best_fraud:.0f} rows/s, batch 1 {fraud_run_us:.1f} us/run;"
        f" (b) service {fraud_b.rps:.0f}/s (p99 {fraud_b.p99_ms:.1f} ms)"
        f" = {fraud_b.rps / best_fraud:.3f}x raw;"
        f" (c) {fraud_c.rps:.0f}/s; (b)/(c) = {fraud_b.rps / fraud_c.rps:.2f}x"
    )
    print(
        f"  fraud:  per-request overhead at 1 connection: p50 {latency_1['fraud'].p50_ms:.3f} ms"
        f" - one run() {fraud_run_us / 1000:.3f} ms = {overhead_ms:.3f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
