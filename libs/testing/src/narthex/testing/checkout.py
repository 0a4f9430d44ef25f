"""Where the checkout is: the repository root that `narthex up`, the benchmarks and the tests
run from (`python -m bench.upstream` resolves there; built models live under it)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["ROOT"]


def _root() -> Path:
    # This package is a workspace member, installed editable: its source is in the checkout.
    for parent in Path(__file__).resolve().parents:
        if (parent / "uv.lock").is_file() and (parent / "bench").is_dir():
            return parent
    raise RuntimeError(f"{__file__} is not inside a narthex checkout")


ROOT = _root()
