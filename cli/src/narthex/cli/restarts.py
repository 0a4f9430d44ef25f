"""When the supervisor restarts a crashed service, and when it gives up instead."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class RestartPolicy:
    """Restart a crashed service after an exponential, capped backoff; give up (and stop
    everything) when one service crashes `max_crashes` times within `window` seconds."""

    max_crashes: int = 5
    window: float = 60.0
    backoff_base: float = 0.5
    backoff_max: float = 10.0

    def __post_init__(self) -> None:
        if self.max_crashes < 1:
            raise ValueError("max_crashes must be at least 1")
        if self.window <= 0 or self.backoff_base <= 0 or self.backoff_max < self.backoff_base:
            raise ValueError("window and backoff must be positive, the cap at least the base")

    def delay(self, crashes: int) -> float:
        """Seconds to wait before restarting after the `crashes`-th crash in the window."""
        # The exponent is bounded first: 2.0 ** 1100 overflows a float.
        return min(self.backoff_max, self.backoff_base * 2.0 ** min(crashes - 1, 64))


class CrashHistory:
    """One service's crashes within the policy's window; older ones are forgotten, so a
    service that crashes once a day is restarted as promptly as the first time."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self._times: deque[float] = deque()

    @property
    def recent(self) -> int:
        """Crashes counted at the last `record`."""
        return len(self._times)

    def record(self, now: float) -> float | None:
        """A crash at `now` (monotonic seconds): how long to wait before restarting, or
        None when this crash uses up the budget and the supervisor should give up."""
        while self._times and self._times[0] <= now - self.policy.window:
            self._times.popleft()
        self._times.append(now)
        if len(self._times) >= self.policy.max_crashes:
            return None
        return self.policy.delay(len(self._times))
