"""One tenant floods inference while another sends a little: `narthex.testing.flood`, under its
old name."""

from __future__ import annotations

from narthex.testing.flood import (
    EMBEDDINGS,
    FLOOD_CLIENTS,
    FLOOD_PLAN,
    FLOOD_TEXTS,
    QUIET_INTERVAL,
    QUIET_PLAN,
    FloodStack,
    Traffic,
    embedding_body,
    flood,
    flood_stack,
    quiet_alone,
)

__all__ = [
    "EMBEDDINGS",
    "FLOOD_CLIENTS",
    "FLOOD_PLAN",
    "FLOOD_TEXTS",
    "QUIET_INTERVAL",
    "QUIET_PLAN",
    "FloodStack",
    "Traffic",
    "embedding_body",
    "flood",
    "flood_stack",
    "quiet_alone",
]
