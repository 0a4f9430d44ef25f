"""What the load test counts as a good answer, how it words a refusal, how long a 429 makes
it wait."""

from __future__ import annotations

import pytest

from narthex.loadtests.answers import counted, has, listing, refusal, retry_after


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [({"retry-after": "3"}, 3.0), ({"retry-after": "0.25"}, 0.25), ({}, 1.0)],
)
def test_a_429_is_waited_out_as_long_as_it_asks(headers: dict[str, str], seconds: float) -> None:
    assert retry_after(headers, ceiling=30.0) == seconds


@pytest.mark.parametrize("value", ["Fri, 04 Dec 2026 23:00:00 GMT", "soon", "-5"])
def test_a_retry_after_that_is_not_seconds_waits_one_or_none(value: str) -> None:
    assert retry_after({"retry-after": value}, ceiling=30.0) in (0.0, 1.0)


def test_a_retry_after_is_honoured_up_to_the_ceiling() -> None:
    assert retry_after({"retry-after": "3600"}, ceiling=30.0) == 30.0


def test_a_problem_is_worded_by_status_and_title_so_that_failures_group() -> None:
    first = '{"type":"https://narthex.dev/problems/x","title":"Nope","request_id":"a1"}'
    second = '{"type":"https://narthex.dev/problems/x","title":"Nope","request_id":"b2"}'
    assert (
        refusal(503, first) == refusal(503, second) == "503 Nope (https://narthex.dev/problems/x)"
    )
    assert refusal(502, "<html>" + "x" * 500) == "502: <html>" + "x" * 94


def test_a_listing_must_have_as_many_items_as_were_sent() -> None:
    check = listing("data", 2)
    assert check({"data": [1, 2]}) is None
    assert check({"data": [1]}) == "1 data for 2 items"
    assert check({"other": []}) == "no list 'data'"
    assert check(["data"]) == "no list 'data'"
    assert listing("data")({"data": []}) == "an empty 'data'"
    assert listing("data")({"data": [1]}) is None


def test_a_field_must_be_there() -> None:
    assert has("daily")({"daily": {}}) is None
    assert has("daily")({}) == "no 'daily'"
    assert has("daily")(None) == "no 'daily'"


def test_every_posted_event_must_be_answered_for() -> None:
    check = counted(5)
    assert check({"accepted": 3, "duplicates": 1, "stale": 1}) is None
    assert check({"accepted": 4, "duplicates": 0, "stale": 0}) == "4 of 5 events answered for"
    assert check("ok") == "-1 of 5 events answered for"
