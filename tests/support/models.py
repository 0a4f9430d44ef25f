"""The built-in models for tests: `narthex.testing.models`, under its old name."""

from __future__ import annotations

from narthex.testing.models import (
    BUILTIN_REPOSITORY,
    builtin_repository,
)

__all__ = [
    "BUILTIN_REPOSITORY",
    "builtin_repository",
]
