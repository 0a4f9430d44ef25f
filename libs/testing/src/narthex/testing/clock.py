"""A clock that moves only when the test says: the seam every time-dependent component takes."""

from __future__ import annotations

__all__ = ["ManualClock"]


class ManualClock:
    """Call it for the time; set `now` or `advance()` to move it (backwards too)."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
