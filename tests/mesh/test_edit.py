"""`narthex mesh set | promote | rollback`: only the weight lines change (comments, order and
formatting kept), writes are atomic, bad weights are refused, and the result validates."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from narthex.cli.main import app
from narthex.cli.mesh_plan import Plans, read_weights, write_atomically
from narthex.cli.mesh_validate import Validator

VS = "base/app/istio/inference-virtualservice.yaml"


def mesh(mesh_dir: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["mesh", *args, "--mesh-dir", str(mesh_dir)])
    return result.exit_code, result.stdout, result.stderr


def changed_lines(before: str, after: str) -> list[tuple[str, str]]:
    old, new = before.splitlines(), after.splitlines()
    assert len(old) == len(new), "an edit must not add or remove lines"
    return [(a, b) for a, b in zip(old, new, strict=True) if a != b]


def weights(mesh_dir: Path) -> dict[str, dict[str, int]]:
    return read_weights(Plans.load(mesh_dir).plan("inference"))


def assert_valid(validator: Validator, mesh_dir: Path) -> None:
    assert validator.run(mesh_dir / "overlays" / "prod") == []


def test_set_changes_only_the_weight_lines(mesh_dir: Path, validator: Validator) -> None:
    before = (mesh_dir / VS).read_text()
    code, out, _ = mesh(mesh_dir, "set", "inference", "v2=10")
    assert code == 0, out
    after = (mesh_dir / VS).read_text()
    assert (
        changed_lines(before, after)
        == [
            ("          weight: 100  # stable", "          weight: 90   # stable"),
            ("          weight: 0    # canary", "          weight: 10   # canary"),
        ]
        * 2
    )
    assert weights(mesh_dir) == {
        "canary-idempotent": {"v1": 90, "v2": 10},
        "canary": {"v1": 90, "v2": 10},
    }
    assert_valid(validator, mesh_dir)


def test_set_both_weights_and_back_restores_the_file_byte_for_byte(mesh_dir: Path) -> None:
    before = (mesh_dir / VS).read_bytes()
    assert mesh(mesh_dir, "set", "inference", "v1=70", "v2=30")[0] == 0
    assert weights(mesh_dir)["canary"] == {"v1": 70, "v2": 30}
    assert mesh(mesh_dir, "set", "inference", "v1=100")[0] == 0
    assert (mesh_dir / VS).read_bytes() == before


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["v2=10", "v1=80"], "weights must sum to 100: v2=10 v1=80 sums to 90"),
        (["v3=10"], "'v3' is not a subset of inference's canary (subsets: v1, v2)"),
        (["v2=101"], "v2=101: a weight is at most 100"),
        (["v2=-5"], "'v2=-5': expected SUBSET=WEIGHT"),
        (["v2=ten"], "'v2=ten': expected SUBSET=WEIGHT"),
        (["v2=10", "v2=20"], "v2 is named twice"),
    ],
)
def test_set_refuses_bad_weights_and_changes_nothing(
    mesh_dir: Path, args: list[str], reason: str
) -> None:
    before = (mesh_dir / VS).read_bytes()
    code, _, err = mesh(mesh_dir, "set", "inference", *args)
    assert code == 1
    assert f"refused: {reason}" in err
    assert (mesh_dir / VS).read_bytes() == before


def test_set_refuses_an_unknown_service(mesh_dir: Path) -> None:
    code, _, err = mesh(mesh_dir, "set", "gateway", "v2=10")
    assert code == 1
    assert "no canary plan for 'gateway' (plans: inference)" in err


def test_dry_run_prints_the_diff_and_writes_nothing(mesh_dir: Path) -> None:
    before = (mesh_dir / VS).read_bytes()
    code, out, _ = mesh(mesh_dir, "set", "inference", "v2=25", "--dry-run")
    assert code == 0
    assert (mesh_dir / VS).read_bytes() == before
    assert f"--- a/{VS}" in out
    assert "-          weight: 0    # canary\n+          weight: 25   # canary\n" in out


def test_promote_walks_the_plan_then_rollback(mesh_dir: Path, validator: Validator) -> None:
    original = (mesh_dir / VS).read_text()
    for step in (10, 25, 50, 100):
        code, out, err = mesh(mesh_dir, "promote")
        assert code == 0, err
        assert f"inference: v1={100 - step} v2={step}" in out
        assert weights(mesh_dir)["canary"] == {"v1": 100 - step, "v2": step}
        assert {line for _, line in changed_lines(original, (mesh_dir / VS).read_text())} == {
            f"          weight: {100 - step:<4} # stable",
            f"          weight: {step:<4} # canary",
        }
        assert_valid(validator, mesh_dir)
    code, out, _ = mesh(mesh_dir, "promote")
    assert code == 0
    assert "already takes 100%" in out
    code, out, _ = mesh(mesh_dir, "rollback")
    assert code == 0
    assert "inference: v1=100 v2=0" in out
    assert (mesh_dir / VS).read_text() == original
    assert_valid(validator, mesh_dir)


def test_promote_follows_the_plan_in_canary_yaml(mesh_dir: Path) -> None:
    plan_file = mesh_dir / "canary.yaml"
    plan_file.write_text(plan_file.read_text().replace("[10, 25, 50, 100]", "[5, 100]"))
    assert mesh(mesh_dir, "promote")[0] == 0
    assert weights(mesh_dir)["canary"] == {"v1": 95, "v2": 5}
    assert mesh(mesh_dir, "promote")[0] == 0
    assert weights(mesh_dir)["canary"] == {"v1": 0, "v2": 100}


def test_promote_refuses_when_the_split_routes_disagree(mesh_dir: Path) -> None:
    path = mesh_dir / VS
    path.write_text(path.read_text().replace("weight: 0    # canary", "weight: 10   # canary", 1))
    code, _, err = mesh(mesh_dir, "promote")
    assert code == 1
    assert "the split routes disagree (canary-idempotent: v1=100 v2=10; canary: v1=100 v2=0)" in err


def test_status_shows_weights_plan_subsets_and_policies(mesh_dir: Path) -> None:
    assert mesh(mesh_dir, "set", "inference", "v2=10")[0] == 0
    code, out, _ = mesh(mesh_dir, "status")
    assert code == 0
    for line in (
        "  route    canary: v1=90 v2=10",
        "  plan     10 -> 25 -> 50 -> 100 (next: 25)",
        "  subset   v2 (version=v2) in DestinationRule inference",
        "  pinned   x-narthex-version: v2 -> v2",
        "  mTLS     STRICT mesh-wide (PeerAuthentication default)",
        "  authz    app=features <- ns/narthex/sa/inference: POST /internal/v1/features:batchGet",
    ):
        assert line in out.splitlines(), line


def test_writes_are_atomic_renames_that_keep_the_mode(tmp_path: Path) -> None:
    path = tmp_path / "vs.yaml"
    path.write_text("old\n")
    path.chmod(0o640)
    inode = path.stat().st_ino
    write_atomically(path, "new\n")
    assert path.read_text() == "new\n"
    assert path.stat().st_ino != inode  # a new file renamed over the old one
    assert path.stat().st_mode & 0o777 == 0o640
    assert os.listdir(tmp_path) == ["vs.yaml"]  # no temporary file left behind


def test_a_failed_write_leaves_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "vs.yaml"
    path.write_text("old\n")
    with pytest.raises(TypeError):
        write_atomically(path, b"not text")  # type: ignore[arg-type]
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["vs.yaml"]


def test_diff_shows_what_applying_would_change(mesh_dir: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=mesh_dir.parent, check=True, capture_output=True)

    git("init", "-q")
    git("add", "mesh")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "mesh")
    assert mesh(mesh_dir, "diff")[0] == 0  # nothing changed yet
    assert mesh(mesh_dir, "set", "inference", "v2=10")[0] == 0
    code, out, _ = mesh(mesh_dir, "diff", "--overlay", "dev")
    assert code == 1
    assert "--- HEAD:dev\n+++ working tree:dev\n" in out
    assert "-      weight: 100\n+      weight: 90\n" in out
    assert "-      weight: 0\n+      weight: 10\n" in out
