"""PyTriton serving minilm's model.onnx as narthex does; runs in the triton peer venv.

It imports nothing of narthex: the venv holds only nvidia-pytriton, onnxruntime, tokenizers
and numpy. Tokenization matches narthex.inference.text (no padding per text, truncation at
`--max-tokens`, a batch padded to its longest member); the batch settings are the model's
own config.yaml's, passed in by the benchmark, its instance count too: as many infer
functions (PyTriton's model instances) sharing one session, each run on the threads narthex
gives a run of that many instances (`--intra-op-threads`, from the benchmark).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig
from tokenizers import Tokenizer


def make_infers(
    version_dir: Path, max_tokens: int, instances: int, intra_op_threads: int
) -> list[Any]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads  # 0: ONNX Runtime's own choice
    session = ort.InferenceSession(
        str(version_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    tokenizer = Tokenizer.from_file(str(version_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_tokens)
    pad = tokenizer.token_to_id("[PAD]") or 0
    names = {i.name for i in session.get_inputs()}

    def instance() -> Any:  # a function of its own per instance, as PyTriton keys them
        @batch  # type: ignore[untyped-decorator]  # pytriton ships no type information
        def infer(text: np.ndarray[Any, Any]) -> dict[str, np.ndarray[Any, Any]]:
            texts = [row[0].decode("utf-8") for row in text]
            ids = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=True)]
            width = max(len(i) for i in ids)
            input_ids = np.full((len(ids), width), pad, dtype=np.int64)
            mask = np.zeros((len(ids), width), dtype=np.int64)
            for row, seq in enumerate(ids):
                input_ids[row, : len(seq)] = seq
                mask[row, : len(seq)] = 1
            feeds = {"input_ids": input_ids, "attention_mask": mask}
            if "token_type_ids" in names:
                feeds["token_type_ids"] = np.zeros_like(input_ids)
            (embedding,) = session.run(None, feeds)
            return {"embedding": embedding.astype(np.float32)}

        return infer

    # A list of infer functions is PyTriton's instance_group count; `run` is thread-safe.
    return [instance() for _ in range(instances)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--version-dir", type=Path, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, required=True)
    parser.add_argument("--max-queue-delay-ms", type=float, required=True)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument(
        "--intra-op-threads", type=int, default=0, help="threads of one run (0: ONNX Runtime's)"
    )
    parser.add_argument("--dimension", type=int, default=384)
    args = parser.parse_args()
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        metrics_address="127.0.0.1",
        metrics_port=args.metrics_port,
        exit_on_error=True,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name="minilm",
            infer_func=make_infers(
                args.version_dir, args.max_tokens, args.instances, args.intra_op_threads
            ),
            inputs=[Tensor(name="text", dtype=np.bytes_, shape=(1,))],
            outputs=[Tensor(name="embedding", dtype=np.float32, shape=(args.dimension,))],
            config=ModelConfig(
                max_batch_size=args.max_batch_size,
                batcher=DynamicBatcher(
                    max_queue_delay_microseconds=int(args.max_queue_delay_ms * 1000)
                ),
            ),
            strict=True,
        )
        triton.serve()


if __name__ == "__main__":
    main()
