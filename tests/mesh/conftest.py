"""A private copy of mesh/ per test, so that edits and broken variants never touch the real one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from narthex.cli.mesh_validate import Validator

MESH = Path(__file__).resolve().parents[2] / "mesh"


@pytest.fixture
def mesh_dir(tmp_path: Path) -> Path:
    copy = tmp_path / "mesh"
    shutil.copytree(MESH, copy)
    return copy


@pytest.fixture(scope="session")
def validator() -> Validator:
    """Schemas loaded once; `run` takes any mesh directory's overlay."""
    return Validator(MESH)
