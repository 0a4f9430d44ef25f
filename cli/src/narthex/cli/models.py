"""`narthex models build`: the built-in models into a model repository, only what is missing."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from narthex.inference.builtin import BUILTIN, build, missing

__all__ = ["BUILTIN", "build_models", "models_dir"]


REPOSITORY_ENV = "NARTHEX_INFERENCE_MODEL_REPOSITORY"


def models_dir(state_dir: Path) -> Path:
    """The repository `narthex up` builds into and serves: the inference service's own
    setting when the caller gives one, else under the state directory."""
    configured = os.environ.get(REPOSITORY_ENV)
    return Path(configured) if configured else state_dir / "models"


def build_models(repository: Path, names: Sequence[str], *, force: bool, out: IO[str]) -> list[str]:
    """Build `names` (all built-in models when empty); the names built, in order."""
    wanted = list(names) or list(BUILTIN)
    todo = wanted if force else missing(repository, wanted)
    for name in wanted:
        if name not in todo:
            out.write(f"{name}: already built in {repository}\n")
    for name in todo:
        out.write(f"{name}: building into {repository} ...\n")
        out.flush()
        started = time.monotonic()
        for metadata in build(repository, [name], force=True)[name]:
            metrics = ", ".join(f"{k} {v:.4g}" for k, v in metadata.training_metrics.items())
            out.write(f"  v{metadata.version}  sha256 {metadata.sha256[:16]}  {metrics}\n")
        out.write(f"{name}: built in {time.monotonic() - started:.1f} s\n")
    return todo
