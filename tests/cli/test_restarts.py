"""The restart policy: exponential, capped backoff; a crash budget over a sliding window."""

from __future__ import annotations

from typing import Any

import pytest

from narthex.cli.restarts import CrashHistory, RestartPolicy


def test_backoff_doubles_from_the_base_up_to_the_cap() -> None:
    policy = RestartPolicy(max_crashes=100, backoff_base=0.5, backoff_max=3.0)
    assert [policy.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]


def test_a_huge_crash_count_stays_at_the_cap() -> None:
    assert RestartPolicy(max_crashes=10_000).delay(5_000) == RestartPolicy().backoff_max


def test_the_crash_that_fills_the_budget_gives_up() -> None:
    history = CrashHistory(RestartPolicy(max_crashes=3, window=60.0, backoff_base=1.0))
    assert history.record(0.0) == 1.0
    assert history.record(1.0) == 2.0
    assert history.record(2.0) is None
    assert history.recent == 3


def test_crashes_older_than_the_window_are_forgotten() -> None:
    history = CrashHistory(RestartPolicy(max_crashes=2, window=60.0, backoff_base=1.0))
    # One crash a minute, forever: never two within 60 s, so never given up on, and
    # each restart comes as promptly as the first.
    for minute in range(10):
        assert history.record(60.0 * minute) == 1.0
        assert history.recent == 1


def test_only_the_crashes_within_the_window_set_the_backoff() -> None:
    history = CrashHistory(RestartPolicy(max_crashes=10, window=10.0, backoff_base=1.0))
    assert [history.record(t) for t in (0.0, 1.0, 2.0)] == [1.0, 2.0, 4.0]
    assert history.record(11.5) == 2.0  # the crashes at 0 and 1 s have left the window


def test_max_crashes_one_gives_up_at_the_first_crash() -> None:
    assert CrashHistory(RestartPolicy(max_crashes=1)).record(0.0) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_crashes": 0},
        {"window": 0.0},
        {"backoff_base": 0.0},
        {"backoff_base": 2.0, "backoff_max": 1.0},
    ],
)
def test_a_policy_that_cannot_work_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message names the field
        RestartPolicy(**kwargs)
