"""The built-in models (`narthex models build`): deterministic, offline, repeatable builds.

Each builder module exposes `VERSIONS` (the versions it writes) and `build(root)`, which
writes the model's `config.yaml` and every version directory under `root` and returns the
versions' metadata. Builders are imported only when used: they pull in training libraries
the service itself does not need.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from narthex.inference.repository import CONFIG_FILE, METADATA_FILE, Metadata, Repository

__all__ = ["BUILTIN", "build", "missing"]

BUILTIN: dict[str, str] = {
    "fraud": "narthex.inference.builtin.fraud",
    "minilm": "narthex.inference.builtin.minilm",
}


def _builder(name: str) -> ModuleType:
    if name not in BUILTIN:
        raise ValueError(f"no built-in model named {name!r}; choose from {sorted(BUILTIN)}")
    return importlib.import_module(BUILTIN[name])


def _complete(root: Path, name: str, versions: Sequence[int]) -> bool:
    repository = Repository(root)
    if not (root / name / CONFIG_FILE).is_file():
        return False
    return all((repository.version_dir(name, v) / METADATA_FILE).is_file() for v in versions)


def missing(root: Path, names: Sequence[str] | None = None) -> list[str]:
    """Built-in models with a version not (completely) written under `root`."""
    return [
        name
        for name in names or list(BUILTIN)
        if not _complete(root, name, _builder(name).VERSIONS)
    ]


def build(
    root: Path, names: Sequence[str] | None = None, *, force: bool = False
) -> dict[str, list[Metadata]]:
    """Build the named models (all by default); without `force`, only the missing ones."""
    todo = list(names or BUILTIN) if force else missing(root, names)
    return {name: _builder(name).build(root) for name in todo}
