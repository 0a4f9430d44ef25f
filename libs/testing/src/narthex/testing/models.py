"""The built-in models for tests: built once into the repository `make run` serves, reused after."""

from __future__ import annotations

import fcntl
from collections.abc import Sequence
from pathlib import Path

from narthex.inference.builtin import BUILTIN, build, missing
from narthex.testing.checkout import ROOT

__all__ = [
    "BUILTIN_REPOSITORY",
    "builtin_repository",
]

# Where `narthex up` (and so `make run`) builds them: a test run leaves them ready for it.
BUILTIN_REPOSITORY = ROOT / ".state" / "models"


def builtin_repository(names: Sequence[str] = tuple(BUILTIN)) -> Path:
    """The repository with `names` built (the first call on a fresh clone builds them;
    minilm's export takes a few minutes then). A lock keeps concurrent builders apart."""
    BUILTIN_REPOSITORY.mkdir(parents=True, exist_ok=True)
    with (BUILTIN_REPOSITORY / ".build.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        todo = missing(BUILTIN_REPOSITORY, names)
        if todo:
            build(BUILTIN_REPOSITORY, todo, force=True)
    return BUILTIN_REPOSITORY
