"""Traffic splits on their own: exact round robin per tenant, sticky keys, the weights' checks,
and `traffic` in config.yaml."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from narthex.inference.main import create_app
from narthex.inference.repository import Repository, RepositoryError, VersionPolicy, write_config
from narthex.inference.settings import InferenceSettings
from narthex.inference.traffic import Split, check_weights
from tests.support.onnx_models import tiny_repository
from tests.support.tokens import static_verifier


def test_round_robin_is_exact_in_every_run_of_ten() -> None:
    split = Split("fraud", {1: 90, 2: 10})
    chosen = [split.choose("t_a") for _ in range(10_000)]
    assert Counter(chosen) == {1: 9000, 2: 1000}
    for start in range(0, 10_000, 10):
        assert chosen[start : start + 10].count(2) == 1


def test_three_versions_and_a_zero_weight() -> None:
    split = Split("m", {1: 50, 2: 30, 3: 20, 4: 0})
    assert Counter(split.choose("t") for _ in range(100)) == {1: 50, 2: 30, 3: 20}
    assert Counter(split.choose("t", key=f"k{i}") for i in range(1000)).keys() <= {1, 2, 3}
    only = Split("m", {1: 0, 2: 100})
    assert {only.choose("t") for _ in range(10)} == {only.choose("t", key="k")} == {2}


def test_one_tenant_does_not_move_another_tenants_sequence() -> None:
    alone = Split("m", {1: 70, 2: 30})
    expected = [alone.choose("t_quiet") for _ in range(20)]
    shared = Split("m", {1: 70, 2: 30})
    seen = []
    for i in range(20):
        for _ in range(i % 7):  # a noisy tenant in between, at an irregular rate
            shared.choose("t_noisy")
        seen.append(shared.choose("t_quiet"))
    assert seen == expected


def test_sticky_keys_are_stable_spread_and_stay_on_a_growing_canary() -> None:
    split = Split("m", {1: 90, 2: 10})
    keys = [f"user-{i}" for i in range(10_000)]
    first = [split.choose("t_a", key=k) for k in keys]
    assert [split.choose("t_b", key=k) for k in keys] == first  # same key, same version
    share = first.count(2) / len(keys)
    assert abs(share - 0.10) <= 0.015
    grown = Split("m", {1: 75, 2: 25})
    assert all(grown.sticky(k) == 2 for k, v in zip(keys, first, strict=True) if v == 2)
    # Another model splits the same keys independently.
    other = Split("n", {1: 90, 2: 10})
    assert [other.sticky(k) for k in keys] != first


@pytest.mark.parametrize(
    ("weights", "versions", "message"),
    [
        ({}, None, "at least one version"),
        ({1: 90, 2: 20}, None, "sum to 110, not 100"),
        ({1: 110, 2: -10}, None, "v2: weight -10 is not a non-negative integer"),
        ({1: 90.0, 2: 10}, None, "weight 90.0"),
        ({1: True, 2: 99}, None, "weight True"),
        ({0: 100}, None, "version 0 is not a version number"),
        ({1: 90, 3: 10}, [1, 2], "v3 not loaded (loaded: v1, v2)"),
    ],
)
def test_bad_weights_say_what_is_wrong(
    weights: dict[Any, Any], versions: list[int] | None, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        check_weights(weights, versions)


def test_traffic_in_config_yaml_round_trips_and_is_checked(tmp_path: Path) -> None:
    root = tiny_repository(tmp_path, traffic={1: 80, 2: 20})
    repository = Repository(root)
    assert repository.config("affine").traffic == {1: 80, 2: 20}
    assert repository.config("words").traffic is None
    (root / "affine" / "config.yaml").write_text(
        (root / "affine" / "config.yaml").read_text().replace("{1: 80,", "{1: 85,")
    )
    with pytest.raises(RepositoryError, match="sum to 105"):
        repository.config("affine")
    config = Repository(tiny_repository(tmp_path / "other")).config("affine")
    write_config(root, config.model_copy(update={"traffic": {1: 100}}))
    assert repository.config("affine").traffic == {1: 100}


async def test_start_up_fails_on_a_split_of_a_version_not_served(tmp_path: Path) -> None:
    root = tiny_repository(
        tmp_path, affine_versions={1: 2.0, 2: 3.0, 3: 4.0}, traffic={1: 90, 3: 10}
    )
    config = Repository(root).config("affine")
    write_config(root, config.model_copy(update={"version_policy": VersionPolicy(specific=[1, 2])}))
    app = create_app(
        InferenceSettings(model_repository=root, tracing=False), verifier=static_verifier
    )
    with pytest.raises(RepositoryError, match=re.escape("affine: v3 not loaded (loaded: v1, v2)")):
        async with app.router.lifespan_context(app):
            pass
