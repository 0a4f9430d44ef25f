"""The tenant-fair queue on its own, driven step by step (no event loop timing, no clock):
fair-share admission, pushing out, deficit round robin for rows and for text tokens."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from typing import Any

import pytest

from narthex.inference.fair_queue import FULL, Chunk, FairQueue, Job, QueueFull

INF = float("inf")


class Tenants:
    """Requests into one queue, and the batches it forms, recorded per tenant."""

    def __init__(self, queue: FairQueue[Any]) -> None:
        self.queue = queue
        self.loop = asyncio.get_running_loop()
        self.served: Counter[str] = Counter()  # rows, or tokens for text
        self.expired: list[Job[Any]] = []

    def job(self, tenant: str, deadline: float = INF) -> Job[Any]:
        return Job(self.loop.create_future(), tenant, deadline, [], 0)

    def send(
        self, tenant: str, rows: int = 1, *, tokens: int = 0, chunks: int = 1, now: float = 0.0
    ) -> tuple[Job[Any], list[Job[Any]]]:
        """One request of `chunks` chunks of `rows` rows (and `tokens` tokens) each."""
        job = self.job(tenant)
        items = [((tenant, i), rows, tokens) for i in range(chunks)]
        return job, self.queue.admit(job, items, now)

    def form(self, now: float = 0.0) -> list[Chunk[Any]]:
        batch = self.queue.form(now)
        for chunk in batch:
            self.served[chunk.job.tenant] += chunk.tokens or chunk.rows
        return batch


def owners(batch: list[Chunk[Any]]) -> list[str]:
    return [chunk.job.tenant for chunk in batch]


def rows_queue(**options: Any) -> FairQueue[Any]:
    settings: dict[str, Any] = {"capacity": 1000, "max_batch_size": 16}
    return FairQueue(**(settings | options))


def text_queue(**options: Any) -> FairQueue[Any]:
    settings: dict[str, Any] = {"capacity": 1000, "max_batch_size": 8, "max_batch_tokens": 80}
    return FairQueue(**(settings | options))


# -- admission ---------------------------------------------------------------------------------


async def test_a_tenant_alone_may_fill_the_whole_queue_and_no_more() -> None:
    tenants = Tenants(rows_queue(capacity=10))
    for _ in range(5):
        tenants.send("flood", 2)
    assert tenants.queue.rows == 10
    with pytest.raises(QueueFull) as refused:
        tenants.send("flood", 1)
    assert refused.value.reason == FULL
    assert tenants.queue.rows == 10


async def test_a_tenant_below_its_share_pushes_out_the_youngest_work_of_the_heaviest() -> None:
    tenants = Tenants(rows_queue(capacity=10))
    flood = [tenants.send("flood", 2)[0] for _ in range(5)]
    _, pushed = tenants.send("quiet", 2)
    assert pushed == [flood[-1]]  # the youngest request, whole
    assert tenants.queue.rows == 10
    assert tenants.queue.active == 2
    # The flooder now holds more than its share (10 / 2): refused, nothing moves.
    with pytest.raises(QueueFull):
        tenants.send("flood", 1)
    # The quiet tenant gets in until it holds its share...
    _, pushed = tenants.send("quiet", 2)
    assert pushed == [flood[-2]]
    _, pushed = tenants.send("quiet", 1)
    assert pushed == [flood[-3]]  # a 2-row request makes room for 1 row: it overshoots
    assert tenants.queue.rows == 9
    tenants.send("quiet", 1)  # room left: admitted without pushing anyone out
    # ...and no further.
    with pytest.raises(QueueFull):
        tenants.send("quiet", 1)
    assert not any(j.future.done() for j in flood)  # failing them is the batcher's job


async def test_the_tenant_holding_the_most_is_pushed_out_and_only_above_its_share() -> None:
    tenants = Tenants(rows_queue(capacity=12))
    big = [tenants.send("big", 1)[0] for _ in range(7)]
    middle = [tenants.send("middle", 1)[0] for _ in range(4)]
    tenants.send("small", 1)
    _, pushed = tenants.send("new", 3)  # share 3: 3 of big's 7, leaving it 4 like middle
    assert pushed == big[-1:-4:-1]
    # Share 12 / 5 = 2.4: the heaviest (big or middle, 4 each) holds 1.6 above it, so 1
    # row can be made for "other", 2 cannot.
    with pytest.raises(QueueFull):
        tenants.send("other", 2)
    _, pushed = tenants.send("other", 1)
    assert len(pushed) == 1
    assert pushed[0] in (big[3], middle[3])
    assert tenants.queue.rows == 12


async def test_a_full_evenly_shared_queue_refuses_without_pushing_anyone_out() -> None:
    tenants = Tenants(rows_queue(capacity=10))
    for _ in range(5):
        tenants.send("a", 1)
        tenants.send("b", 1)
    # Share 10 / 3: "a" and "b" hold 5 each, 1.67 above it: 2 rows cannot be made.
    with pytest.raises(QueueFull):
        tenants.queue.check("c", 2)
    with pytest.raises(QueueFull):
        tenants.send("c", 2)
    assert tenants.queue.rows == 10
    _, pushed = tenants.send("c", 1)
    assert len(pushed) == 1
    assert tenants.queue.rows == 10


async def test_after_pushing_out_the_next_victim_is_whoever_holds_the_most_now() -> None:
    tenants = Tenants(rows_queue(capacity=12))
    a = [tenants.send("a", 1)[0] for _ in range(7)]
    b = [tenants.send("b", 1)[0] for _ in range(5)]
    _, pushed = tenants.send("c", 3)  # share 4: from a, down to 4
    assert pushed == a[-1:-4:-1]
    _, pushed = tenants.send("d", 1)  # b holds 5 now, a 4: b's youngest goes
    assert pushed == [b[-1]]


async def test_the_tenant_holding_the_most_is_found_as_holdings_change() -> None:
    """The lazy heap against a plain max over the lanes, through many admissions, batches,
    refusals and pushes out among hundreds of tenants (seeded: the same run every time)."""
    rng = random.Random(10)
    tenants = Tenants(rows_queue(capacity=2000, max_batch_size=64))
    queue = tenants.queue
    checked = 0
    for step in range(20_000):
        if rng.random() < 0.05:
            tenants.form()
            continue
        tenant = f"t{min(int(rng.paretovariate(1.2)), 400)}"  # a few heavy, many light
        with contextlib.suppress(QueueFull):
            tenants.send(tenant, rng.randint(1, 8))
        if queue.rows > queue.capacity - 8:
            assert queue._heaviest().rows == max(lane.rows for lane in queue._lanes.values())
            checked += 1
        assert len(queue._heavy) <= 2 * len(queue._lanes) + 64, step
    assert checked > 1000


async def test_check_refuses_exactly_what_admit_would_and_changes_nothing() -> None:
    tenants = Tenants(rows_queue(capacity=4))
    tenants.queue.check("flood", 4)  # room
    tenants.send("flood", 4)
    with pytest.raises(QueueFull):
        tenants.queue.check("flood", 1)
    tenants.queue.check("quiet", 1)  # would push out: allowed, but nothing is pushed yet
    assert tenants.queue.rows == 4
    with pytest.raises(QueueFull):
        tenants.queue.check("quiet", 5)  # more than the whole queue


async def test_a_request_bigger_than_the_queue_is_refused_even_when_empty() -> None:
    tenants = Tenants(rows_queue(capacity=4))
    with pytest.raises(QueueFull):
        tenants.send("a", 5)
    assert tenants.queue.rows == tenants.queue.active == 0


# -- deficit round robin: rows -------------------------------------------------------------------


async def test_a_light_tenant_goes_in_the_next_batch_behind_any_flood() -> None:
    tenants = Tenants(rows_queue())
    for _ in range(500):
        tenants.send("flood", 1)
    tenants.form()
    tenants.send("quiet", 1)
    assert "quiet" in owners(tenants.form())


async def test_two_backlogged_tenants_share_every_batch_equally_in_rows() -> None:
    tenants = Tenants(rows_queue(capacity=5000))
    for _ in range(300):
        tenants.send("flood", 4)  # bigger requests...
    for _ in range(400):
        tenants.send("quiet", 1)  # ...do not buy a bigger share
    quantum = tenants.queue.quantum
    while tenants.served["quiet"] < 400:
        batch = tenants.form()
        assert sum(c.rows for c in batch) == 16
        gap = abs(tenants.served["flood"] - tenants.served["quiet"])
        assert gap <= quantum + 4, tenants.served  # within a quantum and a chunk, always
    # The flooder alone then gets whole batches.
    assert owners(tenants.form()) == ["flood"] * 4


async def test_drr_shares_over_many_batches_with_uneven_chunks_and_three_tenants() -> None:
    tenants = Tenants(rows_queue(capacity=100_000, max_batch_size=32))
    sizes = {"a": 32, "b": 7, "c": 1}  # rows per chunk
    for tenant, size in sizes.items():
        for _ in range(4000 // size):
            tenants.send(tenant, size)
    batches = 0
    while min(tenants.queue._lanes[t].rows for t in sizes) >= 64:  # all still backlogged
        tenants.form()
        batches += 1
    assert batches > 50
    served = [tenants.served[t] for t in sizes]
    assert max(served) - min(served) <= tenants.queue.quantum + 32, tenants.served


async def test_batches_keep_to_max_batch_size_and_a_too_big_chunk_goes_alone() -> None:
    tenants = Tenants(rows_queue(max_batch_size=10))
    for _ in range(6):
        tenants.send("a", 3)
    tenants.send("b", 12)  # more than a batch (the batcher never makes one; still safe)
    batches = []
    while tenants.queue.rows:
        batches.append([c.rows for c in tenants.form()])
    assert sorted(batches) == [[3, 3, 3], [3, 3, 3], [12]]


async def test_expired_and_cancelled_requests_are_dropped_before_they_reach_a_batch() -> None:
    expired: list[Job[Any]] = []

    def expire(job: Job[Any]) -> None:  # as the batcher does: the job is done
        expired.append(job)
        job.future.set_exception(TimeoutError())
        job.future.exception()  # retrieved: no "never retrieved" warning

    queue = rows_queue(expire=expire)
    tenants = Tenants(queue)
    late = tenants.job("a", deadline=5.0)
    queue.admit(late, [("late", 1, 0), ("late too", 1, 0)], 0.0)
    cancelled, _ = tenants.send("a", 1)
    cancelled.future.cancel()
    kept, _ = tenants.send("b", 1)
    batch = tenants.form(now=10.0)
    assert [c.job for c in batch] == [kept]
    assert expired == [late]  # once per request, not per chunk
    assert queue.rows == 0


async def test_the_oldest_queued_chunk_is_tracked_across_batches_and_pushing_out() -> None:
    tenants = Tenants(rows_queue(capacity=4, max_batch_size=1))  # a quantum of one row
    for second in (1.0, 2.0, 3.0, 4.0):
        tenants.send("a", 1, now=second)
    assert tenants.queue.oldest() == 1.0
    assert [c.enqueued for c in tenants.form()] == [1.0]
    assert tenants.queue.oldest() == 2.0
    tenants.send("a", 1, now=5.0)
    _, pushed = tenants.send("b", 1, now=6.0)  # pushes out a's youngest, 5.0
    assert len(pushed) == 1
    assert tenants.queue.oldest() == 2.0
    assert [c.enqueued for c in tenants.form()] == [6.0]  # b's turn
    assert tenants.queue.oldest() == 2.0
    assert [c.enqueued for c in tenants.form()] == [2.0]
    assert tenants.queue.oldest() == 3.0
    while tenants.queue.rows:
        tenants.form()
    tenants.send("c", 1, now=9.0)
    assert tenants.queue.oldest() == 9.0


# -- deficit round robin: text -------------------------------------------------------------------


async def test_text_is_shared_by_tokens_not_by_requests() -> None:
    tenants = Tenants(text_queue())  # 8 texts or 80 tokens a batch; a text costs >= 10
    for _ in range(200):
        tenants.send("long", tokens=40)
    for _ in range(800):
        tenants.send("short", tokens=10)
    formed = 0
    while tenants.queue._lanes["short"].rows > 40 and tenants.queue._lanes["long"].rows > 10:
        batch = tenants.form()
        lengths = [c.tokens for c in batch]
        assert len(batch) <= 8
        assert len(batch) * max(lengths) <= 80
        assert max(lengths) <= 2 * min(lengths) + 8  # never a long text padded to a short one
        assert len(batch) == 8 or len(batch) * max(lengths) == 80  # and still whole batches
        formed += 1
    assert formed > 20
    short, long = tenants.served["short"], tenants.served["long"]
    assert abs(short - long) <= tenants.queue.quantum + 80, tenants.served


async def test_a_light_tenant_s_text_goes_first_in_a_short_next_batch() -> None:
    tenants = Tenants(text_queue())  # quantum 20 tokens
    for _ in range(300):
        tenants.send("flood", tokens=12)
    assert len(tenants.form()) == 6  # the flood alone: whole batches, 6 x 12 <= 80
    tenants.send("quiet", tokens=14)
    # The quiet tenant first, then what is left of the flood's visit (at most a quantum of
    # 20 tokens: one text), not a whole batch's worth.
    batch = owners(tenants.form())
    assert batch[0] == "quiet"
    assert batch.count("flood") <= 1
    assert len(tenants.form()) == 6  # and whole batches again


async def test_an_idle_tenant_goes_first_and_the_backlogged_add_a_chunk_each() -> None:
    tenants = Tenants(rows_queue(max_batch_size=16))  # quantum 4 rows
    for tenant in ("a", "b"):
        for _ in range(100):
            tenants.send(tenant, 1)
    tenants.form()
    tenants.form()  # both are backlogged now
    tenants.send("quiet", 1, chunks=2)
    batch = owners(tenants.form())
    assert batch[:2] == ["quiet", "quiet"]
    # a and b: one chunk at most each (b's visit was under way, its credit spent), not 14
    # rows more of the flood.
    assert batch[2:] == ["a"]
    assert len(tenants.form()) == 16


async def test_a_text_too_long_for_any_batch_still_goes_alone() -> None:
    tenants = Tenants(text_queue())
    tenants.send("a", tokens=200)
    tenants.send("a", tokens=5)
    assert [c.tokens for c in tenants.form()] == [200]
    assert [c.tokens for c in tenants.form()] == [5]


async def test_clear_hands_back_every_waiting_request_once() -> None:
    tenants = Tenants(rows_queue())
    jobs = [tenants.send(t, 1, chunks=3)[0] for t in ("a", "b", "a")]
    assert sorted(map(id, tenants.queue.clear())) == sorted(map(id, jobs))
    assert tenants.queue.rows == tenants.queue.active == 0
    assert tenants.form() == []
