"""Sample texts for embedding models: `narthex.testing.texts`, under its old name."""

from __future__ import annotations

from narthex.testing.texts import (
    WORDS,
    texts,
)

__all__ = [
    "WORDS",
    "texts",
]
