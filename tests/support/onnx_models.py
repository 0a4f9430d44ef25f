"""Tiny ONNX models and repositories for the inference tests: exact, instant answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper
from tokenizers import Tokenizer, models, pre_tokenizers

from narthex.inference.repository import (
    DynamicBatching,
    ModelConfig,
    Preprocessing,
    TensorSpec,
    VersionPolicy,
    WarmupSample,
    write_config,
    write_version,
)

__all__ = [
    "WORDS",
    "affine_model",
    "scorer_repository",
    "sum_model",
    "text_model",
    "tiny_repository",
    "word_tokenizer",
]

# The text model's vocabulary: a word's id is its position.
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *(f"w{i}" for i in range(1, 200))]


def affine_model(scale: float, width: int = 3) -> bytes:
    """`y = x * scale + 1` and `total = sum(y, axis=1)` over x: FP32 [n, width]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])
    total = helper.make_tensor_value_info("total", TensorProto.FLOAT, ["n"])
    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "one"], ["y"]),
        helper.make_node("ReduceSum", ["y", "axes"], ["total"], keepdims=0),
    ]
    inits = [
        helper.make_tensor("scale", TensorProto.FLOAT, [], [scale]),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
    ]
    graph = helper.make_graph(nodes, "affine", [x], [y, total], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


def text_model() -> bytes:
    """`embedding = [sum of the unpadded token ids, token count]`: FP32 [n, 2].

    Padding that leaked into the answer would change both numbers."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["n", "seq"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["n", "seq"])
    out = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["n", 2])
    nodes = [
        helper.make_node("Mul", ["input_ids", "attention_mask"], ["kept"]),
        helper.make_node("ReduceSum", ["kept", "axes"], ["sum"], keepdims=1),
        helper.make_node("ReduceSum", ["attention_mask", "axes"], ["count"], keepdims=1),
        helper.make_node("Concat", ["sum", "count"], ["both"], axis=1),
        helper.make_node("Cast", ["both"], ["embedding"], to=TensorProto.FLOAT),
    ]
    inits = [helper.make_tensor("axes", TensorProto.INT64, [1], [1])]
    graph = helper.make_graph(nodes, "text", [ids, mask], [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


def word_tokenizer() -> bytes:
    """Whitespace words to ids, wrapped in [CLS] ... [SEP] like BERT's."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tokenizer.to_str().encode()


def tiny_repository(
    root: Path,
    *,
    affine_versions: dict[int, float] | None = None,
    max_batch_size: int = 8,
    max_queue_delay_ms: float = 2.0,
    max_queue_size: int = 1024,
    max_tokens: int = 16,
    truncate: bool = True,
    **affine: Any,
) -> Path:
    """`affine` (v1: x*2+1, v2: x*3+1 by default) and `words` (the text model)."""
    versions = affine_versions or {1: 2.0, 2: 3.0}
    write_config(
        root,
        ModelConfig(
            name="affine",
            max_batch_size=max_batch_size,
            max_items_per_request=affine.get("max_items_per_request", 100),
            inputs=[TensorSpec(name="x", datatype="FP32", dims=[3])],
            outputs=[
                TensorSpec(name="y", datatype="FP32", dims=[3]),
                TensorSpec(name="total", datatype="FP32", dims=[]),
            ],
            dynamic_batching=DynamicBatching(
                max_queue_delay_ms=max_queue_delay_ms, max_queue_size=max_queue_size
            ),
            version_policy=VersionPolicy(latest=len(versions)),
            default_version=affine.get("default_version"),
            traffic=affine.get("traffic"),
            warmup=[WarmupSample(inputs={"x": [[0.0, 0.0, 0.0]]})],
        ),
    )
    for version, scale in versions.items():
        write_version(
            root,
            "affine",
            version,
            affine_model(scale),
            feature_schema=[{"name": n} for n in ("a", "b", "c")],
            training_metrics={"scale": scale},
        )
    write_config(
        root,
        ModelConfig(
            name="words",
            max_batch_size=max_batch_size,
            inputs=[TensorSpec(name="text", datatype="BYTES", dims=[])],
            outputs=[TensorSpec(name="embedding", datatype="FP32", dims=[2])],
            dynamic_batching=DynamicBatching(
                max_queue_delay_ms=max_queue_delay_ms,
                max_queue_size=max_queue_size,
                max_batch_tokens=64,
            ),
            preprocessing=Preprocessing(kind="text", max_tokens=max_tokens, truncate=truncate),
            warmup=[WarmupSample(inputs={"text": ["w1 w2"]})],
        ),
    )
    write_version(root, "words", 1, text_model(), files={"tokenizer.json": word_tokenizer()})
    return root


def sum_model(width: int) -> bytes:
    """`score = sum(features, axis=1)` over features: FP32 [n, width]."""
    x = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", width])
    score = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["n"])
    nodes = [helper.make_node("ReduceSum", ["features", "axes"], ["score"], keepdims=0)]
    inits = [helper.make_tensor("axes", TensorProto.INT64, [1], [1])]
    graph = helper.make_graph(nodes, "sum", [x], [score], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


def scorer_repository(root: Path, *, max_queue_delay_ms: float = 20.0) -> Path:
    """`scorer`: a transaction model (aggregates looked up by account) that sums its row."""
    from narthex.transactions import MODEL_FEATURES

    width = len(MODEL_FEATURES)
    write_config(
        root,
        ModelConfig(
            name="scorer",
            max_batch_size=64,
            inputs=[TensorSpec(name="features", datatype="FP32", dims=[width])],
            outputs=[TensorSpec(name="score", datatype="FP32", dims=[])],
            dynamic_batching=DynamicBatching(max_queue_delay_ms=max_queue_delay_ms),
            preprocessing=Preprocessing(kind="transaction"),
        ),
    )
    write_version(
        root,
        "scorer",
        1,
        sum_model(width),
        feature_schema=[{"name": f.name, "description": f.description} for f in MODEL_FEATURES],
    )
    return root
