"""The built-in `fraud` model: classifiers trained on simulated transactions, exported by skl2onnx.

Both versions read the same input, `narthex.transactions.model_input` of a transaction
and its account's aggregates (`MODEL_FEATURES`), and answer `label` (0 legit, 1 fraud)
and `probabilities` ([legit, fraud]); they differ by estimator, so that a canary of
v2 against v1 compares something: v1 is a standardised logistic regression, v2
histogram gradient boosting.

The build is deterministic: a fixed simulator seed, fixed estimator seeds, a fixed
target opset and a fixed graph name (skl2onnx would otherwise name the graph with a
random uuid), so two builds write byte-identical `model.onnx` files; only `created_at`
in `metadata.json` differs.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import skl2onnx
import sklearn
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from narthex.inference.repository import (
    DynamicBatching,
    Metadata,
    ModelConfig,
    Preprocessing,
    TensorSpec,
    VersionPolicy,
    WarmupSample,
    write_config,
    write_version,
)
from narthex.transactions import (
    DEFAULTS,
    MODEL_FEATURES,
    Channel,
    TrainingSet,
    Transaction,
    model_input,
    simulate,
    training_set,
)
from narthex.transactions.simulator import START

__all__ = [
    "ACCOUNTS",
    "DAYS",
    "NAME",
    "SEED",
    "TARGET_OPSET",
    "VERSIONS",
    "Training",
    "build",
    "config",
    "estimator",
    "score_histogram",
    "to_onnx",
    "train",
]

NAME = "fraud"
VERSIONS = (1, 2)
# Simulator size: about 33k transactions, 1.2 % fraud; large enough for a holdout AUC
# that means something, small enough for a build of seconds.
SEED = 7
ACCOUNTS = 300
DAYS = 30
HOLDOUT = 0.25
# Pinned: the default follows the installed onnx, and would change the bytes.
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
INPUT = "features"
LABEL = "label"
PROBABILITIES = "probabilities"
_ESTIMATOR_SEED = 0

_DESCRIPTIONS = {
    1: "StandardScaler + LogisticRegression(C=1.0, lbfgs)",
    2: "HistGradientBoostingClassifier(max_iter=200, learning_rate=0.1, max_leaf_nodes=31,"
    f" early stopping on 10 %, random_state={_ESTIMATOR_SEED})",
}


def estimator(version: int) -> Any:
    """The unfitted scikit-learn estimator of a version."""
    if version == 1:
        return Pipeline(
            [
                ("scale", StandardScaler()),
                ("classify", LogisticRegression(C=1.0, max_iter=2_000)),
            ]
        )
    if version == 2:
        # Early stopping set explicitly: "auto" would turn it on or off with the data's size.
        return HistGradientBoostingClassifier(
            max_iter=200,
            learning_rate=0.1,
            max_leaf_nodes=31,
            early_stopping=True,
            validation_fraction=0.1,
            n_iter_no_change=10,
            random_state=_ESTIMATOR_SEED,
        )
    raise ValueError(f"fraud has versions {VERSIONS}, not {version}")


@dataclass(frozen=True, slots=True)
class Training:
    """The simulated data, its split and the fitted estimator of every version."""

    seed: int
    accounts: int
    days: int
    train: TrainingSet
    holdout: TrainingSet
    models: dict[int, Any]

    def fraud_probability(self, version: int, inputs: np.ndarray | None = None) -> np.ndarray:
        """scikit-learn's fraud probability of `inputs` (the holdout by default)."""
        rows = self.holdout.inputs if inputs is None else inputs
        return np.asarray(self.models[version].predict_proba(rows)[:, 1], dtype=np.float64)

    def metrics(self, version: int) -> dict[str, float]:
        scores = self.fraud_probability(version)
        labels = self.holdout.labels
        total = len(self.train) + len(self.holdout)
        return {
            "auc": float(roc_auc_score(labels, scores)),
            "average_precision": float(average_precision_score(labels, scores)),
            "train_rows": float(len(self.train)),
            "holdout_rows": float(len(self.holdout)),
            "fraud_rate": float(self.train.labels.sum() + labels.sum()) / total,
            "holdout_fraud_rate": self.holdout.fraud_rate,
        }


def train(*, seed: int = SEED, accounts: int = ACCOUNTS, days: int = DAYS) -> Training:
    """Simulate, replay into the training set, split by time, fit every version."""
    data = training_set(simulate(seed=seed, accounts=accounts, days=days))
    train_set, holdout = data.split(HOLDOUT)
    if train_set.labels.min() == train_set.labels.max() or len(set(holdout.labels)) < 2:
        raise ValueError(
            f"a simulation of {accounts} accounts over {days} days has too few fraud"
            " cases to train and evaluate on; simulate more"
        )
    # Exactly the float32 rows the served model reads, in the precision the solvers work in.
    inputs = train_set.inputs.astype(np.float64)
    # One BLAS thread: a multithreaded BLAS sums in an order that depends on the thread
    # count, which changes the logistic regression's coefficients (by ~1e-5) and so the
    # model's bytes from one machine to the next. It is also faster on this small data.
    # (HistGradientBoosting's OpenMP loops do not depend on the thread count: checked with
    # 1, 2 and 3 threads.)
    with threadpool_limits(limits=1, user_api="blas"):
        models = {v: estimator(v).fit(inputs, train_set.labels) for v in VERSIONS}
    return Training(seed, accounts, days, train_set, holdout, models)


def to_onnx(model: Any, version: int) -> onnx.ModelProto:
    """The ONNX graph of a fitted version: `features` FP32 [n, F] -> `label`, `probabilities`."""
    classifier = model.steps[-1][1] if isinstance(model, Pipeline) else model
    with warnings.catch_warnings():
        # skl2onnx gives the tree leaves' `nodes_missing_value_tracks_true` as Python
        # False, which protobuf < 7.34 stores as 0 (the right value) with this warning;
        # protobuf >= 7.34 refuses it, hence the pin in the `build` extra.
        warnings.filterwarnings(
            "ignore",
            message=r"Field onnx\.AttributeProto\.ints: Expected an int, got a boolean",
            category=DeprecationWarning,
        )
        proto: onnx.ModelProto = convert_sklearn(
            model,
            # Fixed: skl2onnx names the graph with a random uuid by default.
            name=f"{NAME}_v{version}",
            initial_types=[(INPUT, FloatTensorType([None, len(MODEL_FEATURES)]))],
            target_opset=TARGET_OPSET,
            options={id(classifier): {"zipmap": False}},
        )
    _dedupe_opsets(proto)
    _check_outputs(proto)
    return proto


def _dedupe_opsets(proto: onnx.ModelProto) -> None:
    # skl2onnx lists the default domain twice in opset_import (same version); keep one.
    seen: dict[str, int] = {}
    for entry in proto.opset_import:
        if seen.setdefault(entry.domain, entry.version) != entry.version:
            raise ValueError(f"two versions of opset domain {entry.domain!r}")
    del proto.opset_import[:]
    for domain, version in seen.items():
        proto.opset_import.add(domain=domain, version=version)


_ELEM_TYPES = {"FP32": onnx.TensorProto.FLOAT, "INT64": onnx.TensorProto.INT64}


def _check_outputs(proto: onnx.ModelProto) -> None:
    """The graph's public tensors are those `config()` declares; fail the build otherwise."""
    # (element type, shape with the batch dimension first; -1 where variable)
    expected = {t.name: (_ELEM_TYPES[t.datatype], [-1, *t.dims]) for t in (*_inputs(), *_outputs())}
    actual = {
        v.name: (
            v.type.tensor_type.elem_type,
            [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim],
        )
        for v in (*proto.graph.input, *proto.graph.output)
    }
    if actual != expected:
        raise RuntimeError(f"skl2onnx wrote tensors {actual}, the config declares {expected}")


def _inputs() -> list[TensorSpec]:
    return [TensorSpec(name=INPUT, datatype="FP32", dims=[len(MODEL_FEATURES)])]


def _outputs() -> list[TensorSpec]:
    return [
        TensorSpec(name=LABEL, datatype="INT64", dims=[]),
        TensorSpec(name=PROBABILITIES, datatype="FP32", dims=[2]),
    ]


def _warmup_row() -> list[float]:
    # An ordinary payment by an account the features service does not know yet.
    tx = Transaction(
        event_id="warmup",
        account_id="warmup",
        merchant_id="warmup",
        amount=42.0,
        currency="USD",
        timestamp=START + 12 * 3600,
        channel=Channel.POS,
    )
    return model_input(tx, DEFAULTS)


def config() -> ModelConfig:
    return ModelConfig(
        name=NAME,
        description=(
            "Fraud probability of one card transaction. Input `features`: FP32"
            f" [{len(MODEL_FEATURES)}], narthex.transactions.model_input of the transaction"
            " and its account's aggregates before it (names in each version's"
            " feature_schema). Outputs: `label` (1 = fraud at probability 0.5) and"
            " `probabilities` [legit, fraud]."
        ),
        max_batch_size=256,
        max_items_per_request=100,
        inputs=_inputs(),
        outputs=_outputs(),
        dynamic_batching=DynamicBatching(
            max_queue_delay_ms=2.0, preferred_batch_sizes=[64, 128], max_queue_size=2048
        ),
        version_policy=VersionPolicy(latest=2),
        # v1 instances may name an account instead: its aggregates are looked up.
        preprocessing=Preprocessing(kind="transaction"),
        warmup=[WarmupSample(name="unknown-account", inputs={INPUT: [_warmup_row()]})],
    )


def score_histogram(scores: np.ndarray, bins: int = 10) -> dict[str, list[float]]:
    """Fractions of `scores` in `bins` equal bins over [0, 1] (the last one closed)."""
    counts, edges = np.histogram(np.clip(scores, 0.0, 1.0), bins=bins, range=(0.0, 1.0))
    total = max(int(counts.sum()), 1)
    return {
        "edges": [round(float(e), 10) for e in edges],
        "fractions": [int(c) / total for c in counts],
    }


def _metadata_fields(training: Training, version: int) -> dict[str, Any]:
    metrics = training.metrics(version)
    if not all(math.isfinite(v) for v in metrics.values()):
        raise RuntimeError(f"fraud v{version}: non-finite training metrics {metrics}")
    return {
        "training_metrics": metrics,
        "feature_schema": [{"name": f.name, "description": f.description} for f in MODEL_FEATURES],
        "source": (
            f"{_DESCRIPTIONS[version]} (scikit-learn {sklearn.__version__}), exported by"
            f" skl2onnx {skl2onnx.__version__} at target opset {TARGET_OPSET['']}"
            f" (ai.onnx.ml {TARGET_OPSET['ai.onnx.ml']}); trained on"
            f" narthex.transactions.simulate(seed={training.seed},"
            f" accounts={training.accounts}, days={training.days}), evaluated on the"
            f" latest {HOLDOUT:.0%} of the transactions"
        ),
        "estimator": _DESCRIPTIONS[version],
        # The holdout's fraud-probability distribution, for drift detection against it.
        "score_baseline": score_histogram(training.fraud_probability(version)),
    }


def build(root: Path, *, training: Training | None = None) -> list[Metadata]:
    """Write `fraud/config.yaml` and every version under `root` (training first if not given)."""
    if training is None:
        training = train()
    write_config(root, config())
    return [
        write_version(
            root,
            NAME,
            version,
            to_onnx(training.models[version], version).SerializeToString(),
            **_metadata_fields(training, version),
        )
        for version in VERSIONS
    ]
