"""A version's instances: `instance_group` in config.yaml and its checks, and the intra-op
threads each session run gets (the batcher's side is in test_batcher.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from ruamel.yaml import YAML

from narthex.inference.metrics import InferenceMetrics
from narthex.inference.models import ModelRegistry
from narthex.inference.repository import Repository, RepositoryError
from narthex.inference.runtime import intra_op_threads
from tests.support.onnx_models import tiny_repository


def _with_group(root: Path, group: Any) -> Repository:
    """`affine`'s config.yaml with `instance_group: group`, as a person would write it."""
    path = root / "affine" / "config.yaml"
    yaml = YAML(typ="safe")
    data = yaml.load(path.read_text())
    data["instance_group"] = group
    with path.open("w") as f:
        yaml.dump(data, f)
    return Repository(root)


def test_one_instance_by_default(tmp_path: Path) -> None:
    config = Repository(tiny_repository(tmp_path)).config("affine")
    assert config.instances == 1
    assert config.instance_group[0].kind == "KIND_AUTO"


@pytest.mark.parametrize(
    ("group", "count", "kind"),
    [
        ([{"count": 2, "kind": "KIND_CPU"}], 2, "KIND_CPU"),
        ([{"count": 64}], 64, "KIND_AUTO"),
        ([{}], 1, "KIND_AUTO"),
    ],
)
def test_triton_s_instance_group_is_read(tmp_path: Path, group: Any, count: int, kind: str) -> None:
    config = _with_group(tiny_repository(tmp_path), group).config("affine")
    assert (config.instances, config.instance_group[0].kind) == (count, kind)


@pytest.mark.parametrize(
    ("group", "message"),
    [
        ([{"count": 0}], "instance_group.0.count: Input should be greater than or equal to 1"),
        ([{"count": 65}], "instance_group.0.count: Input should be less than or equal to 64"),
        ([{"count": "two"}], "instance_group.0.count: Input should be a valid integer"),
        ([{"count": 1, "kind": "KIND_GPU"}], "instance_group.0.kind: Input should be"),
        ([{"count": 1, "gpus": [0]}], "instance_group.0.gpus: Extra inputs are not permitted"),
        ([], "instance_group has 0 groups; give exactly one"),
        ([{"count": 1}, {"count": 2}], "instance_group has 2 groups; give exactly one"),
    ],
)
def test_a_bad_instance_group_says_what_is_wrong(tmp_path: Path, group: Any, message: str) -> None:
    repository = _with_group(tiny_repository(tmp_path), group)
    with pytest.raises(RepositoryError, match=re.escape(message)) as raised:
        repository.config("affine")
    assert "affine/config.yaml" in str(raised.value)  # which file, as for every config error


@pytest.mark.parametrize(
    ("setting", "instances", "cpus", "threads"),
    [
        (0, 1, 8, 0),  # one instance: ONNX Runtime's own choice, as before instances
        (0, 2, 8, 4),
        (0, 2, 2, 1),
        (0, 3, 2, 1),  # never below one
        (0, 3, 8, 2),
        (3, 2, 8, 3),  # an explicit setting wins
        (5, 1, 2, 5),
    ],
)
def test_intra_op_threads_split_the_cores_between_instances(
    setting: int, instances: int, cpus: int, threads: int
) -> None:
    assert intra_op_threads(setting, instances, cpus) == threads


@pytest.mark.parametrize(("setting", "expected"), [(0, intra_op_threads(0, 2)), (3, 3)])
async def test_a_loaded_version_has_its_instances_and_their_threads(
    tmp_path: Path, setting: int, expected: int
) -> None:
    root = tiny_repository(tmp_path)
    _with_group(root, [{"count": 2, "kind": "KIND_CPU"}])
    registry = ModelRegistry(
        Repository(root), InferenceMetrics(CollectorRegistry()), intra_op_threads=setting
    )
    try:
        loaded = await registry.load("affine", 1, make_default=True)
        assert loaded.batcher.instances == 2
        assert loaded.session.intra_op_threads == expected
        assert loaded.provider == "CPUExecutionProvider"
        words = await registry.load("words", 1, make_default=True)  # one instance
        assert words.batcher.instances == 1
        assert words.session.intra_op_threads == setting
    finally:
        await registry.close()
