"""Circuit breaking for asyncio on top of pybreaker's state machine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pybreaker

T = TypeVar("T")

CLOSED, OPEN, HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN


class BreakerOpen(Exception):
    """The breaker refused the call without reaching the upstream."""

    def __init__(self, name: str, retry_after: float) -> None:
        super().__init__(f"circuit {name!r} is open")
        self.name = name
        self.retry_after = retry_after


class AsyncCircuitBreaker:
    """pybreaker driven through `calling()`, safe for coroutines.

    pybreaker's own `call()` only sees the coroutine object, so a failure raised when
    it is awaited is never counted; and its half-open state admits every caller. Here
    the awaited call runs inside `calling()`, so every outcome goes through pybreaker's
    counters and transitions, and half-open admits exactly one trial at a time: the
    others fail fast until the trial has decided the state.

    Outcomes are of three kinds. A failure (`is_failure` says so) counts; a success
    resets the count (closes a half-open breaker). A neutral outcome (`is_failure` says
    no, or the call was cancelled) says nothing about the upstream and changes nothing:
    the consecutive count stays where it was, and a neutral trial leaves the breaker
    half-open for the next caller to try. Callers decide what is neutral, so it must
    never be something a client can choose to make happen (its own deadline, its
    disconnect) and still move the state others depend on, either way: opening it, or
    resetting the count or re-opening it to keep an upstream switched off.
    """

    def __init__(
        self,
        name: str,
        *,
        fail_max: int = 5,
        reset_timeout: float = 10.0,
        is_failure: Callable[[BaseException], bool] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self._is_failure = is_failure or (lambda exc: True)
        self._trial_in_flight = False
        self._storage = _ClockedStorage(clock)
        self._breaker = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout,
            state_storage=self._storage,
            # pybreaker counts an excluded exception as a success; `call` undoes that.
            exclude=[self._is_neutral],
            throw_new_error_on_trip=False,
            name=name,
        )

    @property
    def state(self) -> str:
        """closed | open | half-open (pybreaker's state names)."""
        state = self._breaker.current_state
        if state == OPEN and self.retry_after() <= 0:
            return HALF_OPEN  # the next call will be admitted as the trial
        return str(state)

    @property
    def fail_counter(self) -> int:
        return int(self._breaker.fail_counter)

    def retry_after(self) -> float:
        """Seconds until an open breaker admits a trial call (0 when not open)."""
        if self._breaker.current_state != OPEN:
            return 0.0
        elapsed = self._storage.open_for()
        if elapsed is None:
            return 0.0
        return max(0.0, self._breaker.reset_timeout - elapsed)

    def _is_neutral(self, exc: BaseException) -> bool:
        return isinstance(exc, asyncio.CancelledError) or not self._is_failure(exc)

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        breaker = self._breaker
        if self._storage.state == CLOSED and not breaker._listeners:
            return await self._call_closed(fn)
        if self._trial_in_flight:
            raise BreakerOpen(self.name, max(self.retry_after(), 0.1))
        # Set, with no await in between, when a neutral outcome leaves the call:
        # (whether it was the trial, the failure count at that instant).
        neutral: tuple[bool, int] | None = None
        try:
            with self._breaker.calling():
                # Entering may have moved open -> half-open: this caller is the trial.
                # No await between that transition and taking the trial slot.
                trial = self._breaker.current_state == HALF_OPEN
                self._trial_in_flight = trial
                try:
                    return await fn()
                except BaseException as exc:
                    if self._is_neutral(exc):
                        neutral = (trial, self._breaker.fail_counter)
                    raise
                finally:
                    self._trial_in_flight = False
        except pybreaker.CircuitBreakerError:
            raise BreakerOpen(self.name, self.retry_after()) from None
        finally:
            if neutral is not None:
                self._undo_success(*neutral)

    async def _call_closed(self, fn: Callable[[], Awaitable[T]]) -> T:
        """`call` on a closed breaker: the same outcome handling as through `calling()`
        (the closed state's handlers, for the state object current when the call began),
        without its generator, context manager and lock, some 25 us a call of the proxy
        path. Closed, there is no trial and nothing to check before the call."""
        state = self._breaker.state  # pybreaker's cached state object, brought up to date
        try:
            result = await fn()
        except BaseException as exc:
            neutral = self._is_neutral(exc)
            fail_count = self._breaker.fail_counter
            try:
                # A failure counts (and may open the breaker: then it raises `exc`
                # itself); a neutral outcome is taken for a success, undone below.
                state._handle_error(exc, reraise=False)
            finally:
                if neutral:
                    self._undo_success(False, fail_count)
            raise
        state._handle_success()
        return result

    def _undo_success(self, trial: bool, fail_count: int) -> None:
        """pybreaker has just taken a neutral outcome for a success: put back the state."""
        if trial:
            if self._breaker.current_state == CLOSED:
                self._breaker.half_open()
            return
        storage = self._storage
        storage.reset_counter()
        for _ in range(fail_count):
            storage.increment_counter()


class _ClockedStorage(pybreaker.CircuitMemoryStorage):
    """pybreaker's memory storage with the time it opened taken from `clock`.

    pybreaker stamps the opening with `datetime.now()` and compares it with a later
    `datetime.now()`; here the stamp is `clock()`, and it is read back as "now, less
    what `clock` says has passed since", so that comparison measures `clock`'s time.
    With `time.time` that is pybreaker's own behaviour; a test's clock drives it.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(CLOSED)
        self._clock = clock
        self._opened: float | None = None

    def open_for(self) -> float | None:
        """Seconds (of `clock`) since it last opened; None if it never did."""
        return None if self._opened is None else self._clock() - self._opened

    @property
    def opened_at(self) -> datetime | None:
        elapsed = self.open_for()
        return None if elapsed is None else datetime.now(UTC) - timedelta(seconds=elapsed)

    @opened_at.setter
    def opened_at(self, _value: datetime) -> None:
        self._opened = self._clock()
