"""The GPU check: minilm on CUDA, raw ONNX Runtime against the narthex inference service.

`python -m bench.gpu_check` (on a machine with one NVIDIA GPU and this repository) prints:
  - the execution provider each side really uses (read back from the session and from the
    service's model metadata; asking for CUDA is not getting it: onnxruntime-gpu falls back
    to the CPU silently),
  - raw ONNX Runtime in a process of its own: batch-1 latency (p50, p99) and texts/s per
    batch size, the best of them being the ceiling,
  - the service (`POST /v1/embeddings`, one text per request, JWT): req/s and p50/p99 at
    64 connections, p50 at 1 connection, and its ratio to the raw best,
in under five minutes. It fails at once, saying why, when no CUDA device is there.

onnxruntime-gpu: used from `--python` if given, or from this interpreter if its onnxruntime
offers CUDA; otherwise installed into `.tools/peers/onnxruntime-gpu`, a venv layered over the
project's (its own site-packages first, so its `onnxruntime` module wins; the project's
packages, narthex included, after it). `--cuda-wheels` adds NVIDIA's CUDA and cuDNN wheels
there, for a machine without a system CUDA. `--provider cpu` runs the same steps on the CPU:
the check of the check, on any machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import site
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.proxy import ROOT, BenchError, wrk_post
from narthex.testing.models import builtin_repository
from narthex.testing.platform import Spec, edge, exchange, inference_spec, running
from narthex.testing.texts import texts

EXIT_NO_CUDA = 3
BATCH_SIZES = (1, 8, 32, 64, 128)
OVERLAY = ROOT / ".tools" / "peers" / "onnxruntime-gpu"
WANTED = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


class NoCuda(BenchError):
    """No usable CUDA device or runtime: the check cannot run here."""


def _providers(python: str) -> list[str]:
    code = "import onnxruntime as o, json; print(json.dumps(o.get_available_providers()))"
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return []
    providers: list[str] = json.loads(done.stdout)
    return providers


def _overlay(cuda_wheels: bool) -> str:
    """The layered venv's python, made when missing."""
    python = OVERLAY / "bin" / "python"
    marker = OVERLAY / "narthex-gpu.json"
    if python.is_file() and marker.is_file():
        return str(python)
    if OVERLAY.exists():
        shutil.rmtree(OVERLAY)
    print(f"installing onnxruntime-gpu into {OVERLAY} ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(OVERLAY)], check=True)
    own = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # Executed at start-up after the venv's own site-packages is on sys.path: the project's
    # come after it, with their .pth files (narthex's editable installs) processed too.
    project = [p for p in site.getsitepackages() if p.endswith("site-packages")]
    lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in project)
    Path(own, "narthex-project.pth").write_text(lines, encoding="utf-8")
    version = subprocess.run(
        [sys.executable, "-c", "import onnxruntime as o; print(o.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    package = f"onnxruntime-gpu[cuda,cudnn]=={version}" if cuda_wheels else "onnxruntime-gpu"
    # Everything the project already has is satisfied from its site-packages: only the GPU
    # build (and, if asked, NVIDIA's libraries) lands here.
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-input", package],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        shutil.rmtree(OVERLAY, ignore_errors=True)
        raise NoCuda(
            f"onnxruntime-gpu is not installed and pip could not install it"
            f" (pass --python with an interpreter that has it):\n{done.stdout[-1500:]}"
            f"{done.stderr[-1500:]}"
        )
    marker.write_text(json.dumps({"package": package}), encoding="utf-8")
    return str(python)


def runtime_python(args: argparse.Namespace) -> str:
    """An interpreter whose onnxruntime offers the wanted provider; NoCuda if none can."""
    if args.provider == "cpu":
        return args.python or sys.executable
    if shutil.which("nvidia-smi") is None and not Path("/dev/nvidia0").exists():
        raise NoCuda("no NVIDIA GPU here: neither nvidia-smi nor /dev/nvidia0 exists")
    for python in [args.python] if args.python else [sys.executable]:
        if WANTED["cuda"] in _providers(python):
            return str(python)
    if args.python:
        raise NoCuda(f"{args.python}: its onnxruntime offers no CUDAExecutionProvider")
    python = _overlay(args.cuda_wheels)
    if WANTED["cuda"] not in _providers(python):
        raise NoCuda(f"{python}: onnxruntime-gpu installed, but it offers no CUDA provider")
    return python


# -- raw ONNX Runtime, in the child process ---------------------------------------------------


def raw_child(version_dir: Path, provider: str, seconds: float) -> dict[str, Any]:
    """Runs under the runtime python: the session alone, pre-tokenized batches."""
    import numpy as np
    import onnxruntime as ort

    from narthex.inference.text import TextEncoder

    if provider == "cuda":
        preload = getattr(ort, "preload_dlls", None)
        if preload is not None:  # NVIDIA's CUDA/cuDNN wheels, where installed
            preload()
    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else []
    session = ort.InferenceSession(
        str(version_dir / "model.onnx"), providers=[*wanted, "CPUExecutionProvider"][:2]
    )
    used = session.get_providers()[0]
    encoder = TextEncoder(
        version_dir / "tokenizer.json",
        max_tokens=256,
        truncate=True,
        graph_inputs=[i.name for i in session.get_inputs()],
    )
    pool = encoder.encode(texts(512))
    rates: dict[int, float] = {}
    latency: dict[int, list[float]] = {}
    for batch in BATCH_SIZES:
        feeds = encoder.collate(pool[:batch])
        session.run(None, feeds)  # this shape's first run is not timed
        done, times = 0, []
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            feeds = encoder.collate(pool[done % 256 : done % 256 + batch])
            t0 = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - t0)
            done += batch
        rates[batch] = done / (time.perf_counter() - started)
        latency[batch] = times
    ms = {b: sorted(t) for b, t in latency.items()}
    return {
        "provider": used,
        "available": ort.get_available_providers(),
        "rates": rates,
        "p50_ms": {b: 1000 * t[len(t) // 2] for b, t in ms.items()},
        "p99_ms": {b: 1000 * t[min(len(t) - 1, int(len(t) * 0.99))] for b, t in ms.items()},
        "np": np.__version__,
    }


def raw(python: str, version_dir: Path, provider: str, seconds: float) -> dict[str, Any]:
    argv = [python, "-m", "bench.gpu_check", "--raw-child", str(version_dir)]
    argv += ["--provider", provider, "--raw-seconds", str(seconds)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"raw run failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# -- the service --------------------------------------------------------------------------------


def service_run(
    python: str, repository: Path, provider: str, seconds: int
) -> tuple[str, dict[str, Any]]:
    """(provider the service really uses, its wrk results)."""
    with tempfile.TemporaryDirectory(prefix="narthex-gpu-") as tmp:
        directory = Path(tmp)
        with edge(directory) as platform:
            spec = inference_spec("inference", platform.auth.url, repository, provider=provider)
            spec = Spec(spec.label, (python, *spec.argv[1:]), spec.env, spec.ready_path)
            with running([spec], directory, timeout=180) as (service,):
                token = exchange(platform.auth.url, platform.admin_key)
                meta = httpx.get(
                    service.url + "/v2/models/minilm",
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=30,
                ).json()
                used = str(meta["parameters"]["provider"])
                url = service.url + "/v1/embeddings"
                bodies = [
                    json.dumps({"model": "minilm", "input": t}).encode() for t in texts(256, seed=2)
                ]
                wrk_post(url, bodies, token, 2, 64)  # warm-up, not measured
                c64 = wrk_post(url, bodies, token, seconds, 64)
                c1 = wrk_post(url, bodies, token, seconds, 1)
    return used, {"c64": c64, "c1": c1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    parser.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--python", help="an interpreter whose onnxruntime is onnxruntime-gpu")
    parser.add_argument("--cuda-wheels", action="store_true", help="also NVIDIA's CUDA wheels")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--raw-seconds", type=float, default=3.0, help="per raw batch size")
    parser.add_argument("--raw-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.raw_child is not None:
        print(json.dumps(raw_child(args.raw_child, args.provider, args.raw_seconds)))
        return 0
    started = time.monotonic()
    want = WANTED[args.provider]
    try:
        python = runtime_python(args)
        repository = builtin_repository(["minilm"])
        print(f"runtime: {python} (asked for {want})", flush=True)
        result = raw(python, repository / "minilm" / "1", args.provider, args.raw_seconds)
        print(f"raw ONNX Runtime provider actually used: {result['provider']}")
        if result["provider"] != want:
            raise NoCuda(
                f"asked for {want}, ONNX Runtime used {result['provider']}"
                f" (available: {result['available']}): no usable CUDA device or libraries"
            )
        used, runs = service_run(python, repository, args.provider, args.duration)
        print(f"service provider actually used: {used}")
        if used != want:
            raise NoCuda(f"the service asked for {want} and got {used}")
    except NoCuda as exc:
        print(f"error: CUDA is not available: {exc}", file=sys.stderr)
        return EXIT_NO_CUDA
    except (BenchError, RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    rates = {int(k): v for k, v in result["rates"].items()}
    best = max(rates, key=rates.__getitem__)
    print("\nraw ONNX Runtime, minilm, pre-tokenized ~16-token texts")
    print(f"{'batch':>6}{'texts/s':>10}{'p50 ms':>9}{'p99 ms':>9}")
    for batch in rates:
        p50, p99 = result["p50_ms"][str(batch)], result["p99_ms"][str(batch)]
        print(f"{batch:>6}{rates[batch]:>10.0f}{p50:>9.2f}{p99:>9.2f}")
    c64, c1 = runs["c64"], runs["c1"]
    print(f"\nservice, POST /v1/embeddings, one text per request, {args.duration}s each")
    print(
        f"  64 connections: {c64.rps:.0f} req/s, p50 {c64.p50_ms:.2f} ms, p99 {c64.p99_ms:.2f} ms"
    )
    print(f"   1 connection:  {c1.rps:.0f} req/s, p50 {c1.p50_ms:.2f} ms, p99 {c1.p99_ms:.2f} ms")
    print("\nsummary")
    print(f"  provider: raw {result['provider']}, service {used}")
    print(
        f"  service / raw best (batch {best}, {rates[best]:.0f} texts/s):"
        f" {c64.rps / rates[best]:.2f}x"
    )
    print(
        f"  batch-1 latency: raw p50 {result['p50_ms']['1']:.2f} ms, through the service at"
        f" 1 connection p50 {c1.p50_ms:.2f} ms; batch {best} raw p50"
        f" {result['p50_ms'][str(best)]:.2f} ms"
    )
    print(f"  took {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
