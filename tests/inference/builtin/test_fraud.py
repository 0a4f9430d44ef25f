"""The built-in fraud model: faithful ONNX export, useful AUC, a verified and reproducible build."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from narthex.inference.builtin import fraud
from narthex.inference.repository import MODEL_FILE, Metadata, Repository, RepositoryError
from narthex.transactions import MODEL_FEATURE_NAMES

# Measured on the default build: v1 0.964, v2 0.977 (holdout of 8362 rows, 101 fraud).
AUC_FLOOR = 0.92


@pytest.fixture(scope="module")
def training() -> fraud.Training:
    return fraud.train()


@pytest.fixture(scope="module")
def built(
    training: fraud.Training, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[Metadata]]:
    root = tmp_path_factory.mktemp("models")
    return root, fraud.build(root, training=training)


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("version", fraud.VERSIONS)
def test_onnx_runtime_matches_scikit_learn_on_the_holdout(
    built: tuple[Path, list[Metadata]], training: fraud.Training, version: int
) -> None:
    root, _ = built
    inputs = training.holdout.inputs
    labels, probabilities = session(root / "fraud" / str(version) / MODEL_FILE).run(
        ["label", "probabilities"], {"features": inputs}
    )
    expected = training.models[version].predict_proba(inputs.astype(np.float64))
    assert probabilities.dtype == np.float32
    assert probabilities.shape == (len(inputs), 2)
    np.testing.assert_allclose(probabilities, expected, rtol=0, atol=1e-5)
    assert labels.dtype == np.int64
    assert labels.shape == (len(inputs),)
    decided = np.abs(expected[:, 1] - 0.5) > 1e-5
    assert np.array_equal(labels[decided], (expected[decided, 1] > 0.5).astype(np.int64))


def test_both_versions_beat_chance_by_far_and_differ(training: fraud.Training) -> None:
    for version in fraud.VERSIONS:
        assert training.metrics(version)["auc"] > AUC_FLOOR
    v1, v2 = training.fraud_probability(1), training.fraud_probability(2)
    assert np.abs(v1 - v2).max() > 0.1
    assert not np.array_equal(v1 > 0.5, v2 > 0.5)


def test_repository_reads_the_build_with_verified_digests(
    built: tuple[Path, list[Metadata]], training: fraud.Training
) -> None:
    root, written = built
    repository = Repository(root)
    config = repository.config("fraud")
    assert config == fraud.config()
    assert repository.served_versions("fraud") == [1, 2]
    assert config.default_version is None
    for version, metadata in zip(fraud.VERSIONS, written, strict=True):
        read = repository.metadata("fraud", version, verify=True)
        assert read == metadata
        assert read.training_metrics == training.metrics(version)
        assert {"auc", "train_rows", "holdout_rows", "fraud_rate"} <= set(read.training_metrics)
        assert [f["name"] for f in read.feature_schema] == list(MODEL_FEATURE_NAMES)
        extra = read.model_extra or {}
        assert extra["estimator"]
        baseline = extra["score_baseline"]
        assert len(baseline["edges"]) == 11
        assert len(baseline["fractions"]) == 10
        assert sum(baseline["fractions"]) == pytest.approx(1.0)
        # Most transactions are legitimate: the first bin holds most of the mass.
        assert baseline["fractions"][0] > 0.9
        assert f"seed={fraud.SEED}" in read.source


def test_warmup_sample_runs(built: tuple[Path, list[Metadata]]) -> None:
    root, _ = built
    (sample,) = fraud.config().warmup
    features = np.asarray(sample.inputs["features"], dtype=np.float32)
    for version in fraud.VERSIONS:
        _, probabilities = session(root / "fraud" / str(version) / MODEL_FILE).run(
            None, {"features": features}
        )
        assert probabilities.shape == (1, 2)
        assert 0 <= probabilities[0, 1] < 0.5


def test_a_tampered_model_is_refused(built: tuple[Path, list[Metadata]], tmp_path: Path) -> None:
    root, _ = built
    copy = tmp_path / "models"
    (copy / "fraud" / "1").mkdir(parents=True)
    for name in ("config.yaml", "1/metadata.json", f"1/{MODEL_FILE}"):
        (copy / "fraud" / name).write_bytes((root / "fraud" / name).read_bytes())
    model = copy / "fraud" / "1" / MODEL_FILE
    data = bytearray(model.read_bytes())
    data[-1] ^= 1
    model.write_bytes(bytes(data))
    with pytest.raises(RepositoryError, match="sha256"):
        Repository(copy).metadata("fraud", 1, verify=True)


def test_too_small_a_simulation_is_refused() -> None:
    with pytest.raises(ValueError, match="too few fraud"):
        fraud.train(accounts=2, days=2)


@pytest.mark.slow
def test_a_rebuild_elsewhere_is_byte_identical(
    built: tuple[Path, list[Metadata]], tmp_path: Path
) -> None:
    # Another process, another hash seed and other thread counts: nothing of those may
    # leak into the model bytes.
    root, _ = built
    env = os.environ | {"PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, pathlib; from narthex.inference.builtin import fraud;"
            " fraud.build(pathlib.Path(sys.argv[1]))",
            str(tmp_path),
        ],
        env=env,
        check=True,
        timeout=100,
    )
    for version in fraud.VERSIONS:
        name = f"fraud/{version}/{MODEL_FILE}"
        assert (tmp_path / name).read_bytes() == (root / name).read_bytes(), name
    assert (tmp_path / "fraud/config.yaml").read_bytes() == (
        root / "fraud/config.yaml"
    ).read_bytes()
