"""The dynamic batcher: batching, bounds, deadlines, cancellation, isolation, token budgets,
fairness across tenants (the queue's own rules are in test_fair_queue.py), low-load latency,
several instances computing at once."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from narthex.inference.batcher import (
    FULL,
    PUSHED_OUT,
    Batcher,
    BatcherClosed,
    BatchHooks,
    ComputeFailed,
    DeadlineExpired,
    Kind,
    QueueFull,
)


class Recorder:
    """A model kind that records each batch it computes, optionally slow or failing."""

    def __init__(self, *, delay: float = 0.0, fail_on: object = None) -> None:
        self.batches: list[list[Any]] = []
        self.delay = delay
        self.fail_on = fail_on
        self.gate = threading.Event()
        self.gate.set()

    async def prepare(self, payloads: list[Any]) -> None:
        pass

    def compute(self, payloads: list[Any]) -> list[Any]:
        self.gate.wait(10)
        if self.delay:
            time.sleep(self.delay)
        self.batches.append(list(payloads))
        if self.fail_on is not None and self.fail_on in payloads:
            raise RuntimeError("node Gemm_3: bad input")
        return [("done", p) for p in payloads]

    @property
    def computed(self) -> list[Any]:
        return [p for batch in self.batches for p in batch]


@asynccontextmanager
async def running(compute: Kind[Any, Any], **options: Any) -> AsyncIterator[Batcher[Any, Any]]:
    settings: dict[str, Any] = {
        "name": "test",
        "max_batch_size": 8,
        "max_delay_s": 0.005,
        "max_queue_size": 1000,
    }
    batcher: Batcher[Any, Any] = Batcher(compute, **(settings | options))
    batcher.start()
    try:
        yield batcher
    finally:
        await batcher.close()


async def queue_empty(batcher: Batcher[Any, Any]) -> None:
    """Until what was submitted has left the queue (for compute, blocked at its gate)."""
    await asyncio.sleep(0)  # the submitting tasks run first
    for _ in range(10_000):  # the batcher offers no event for this; poll, bounded
        if not batcher.depth:
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the queue never emptied")


async def queue_empty_of_first_batch(batcher: Batcher[Any, Any], left: int) -> None:
    """Until the first batch has left the queue for compute, `left` items still waiting."""
    await asyncio.sleep(0)
    for _ in range(10_000):
        if batcher.depth == left:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"the queue holds {batcher.depth} items, not {left}")


@pytest.mark.parametrize("instances", [1, 2])
async def test_concurrent_requests_share_batches_and_get_their_own_results(instances: int) -> None:
    compute = Recorder(delay=0.01)
    async with running(compute, instances=instances) as batcher:
        results = await asyncio.gather(*(batcher.submit([(i, 1, 0)]) for i in range(40)))
    assert results == [[("done", i)] for i in range(40)]
    assert sorted(compute.computed) == list(range(40))
    assert max(len(b) for b in compute.batches) == 8  # full batches formed...
    assert len(compute.batches) < 40  # ...so fewer runs than requests


class Preparing(Recorder):
    """A kind whose batches are prepared (as a transaction model's are looked up)."""

    def __init__(self) -> None:
        super().__init__(delay=0.01)
        self.prepared: list[list[Any]] = []
        self.prepared_on: set[int] = set()

    async def prepare(self, payloads: list[Any]) -> None:
        await asyncio.sleep(0)  # async work, as a lookup is
        self.prepared.append(list(payloads))
        self.prepared_on.add(threading.get_ident())

    def compute(self, payloads: list[Any]) -> list[Any]:
        assert payloads in self.prepared  # this very batch, before its compute
        return super().compute(payloads)


async def test_each_formed_batch_is_prepared_once_on_the_loop_before_compute() -> None:
    kind = Preparing()
    async with running(kind) as batcher:
        results = await asyncio.gather(*(batcher.submit([(i, 1, 0)]) for i in range(20)))
    assert results == [[("done", i)] for i in range(20)]
    assert kind.prepared == kind.batches  # one prepare per batch, no more
    assert len(kind.batches) < 20  # batches of several requests, each prepared once
    assert kind.prepared_on == {threading.get_ident()}  # the event loop's thread


async def test_a_batch_never_exceeds_max_batch_size_in_rows() -> None:
    compute = Recorder(delay=0.01)
    async with running(compute, max_batch_size=10) as batcher:
        requests = [[(f"{r}.{c}", 3, 0) for c in range(2)] for r in range(12)]  # 6 rows each
        results = await asyncio.gather(*(batcher.submit(chunks) for chunks in requests))
    for chunks, result in zip(requests, results, strict=True):
        assert result == [("done", payload) for payload, _, _ in chunks]
    # Rows per batch: chunks of 3, at most 10 rows, so at most 3 chunks.
    assert all(len(batch) <= 3 for batch in compute.batches)


async def test_a_lone_request_is_sent_after_the_delay_without_waiting_for_company() -> None:
    compute = Recorder()
    async with running(compute, max_delay_s=0.02) as batcher:
        assert await batcher.submit([("alone", 1, 0)]) == [("done", "alone")]
    assert compute.batches == [["alone"]]


@pytest.mark.parametrize("instances", [1, 2])
async def test_a_lone_request_goes_at_once_when_nothing_else_waits(instances: int) -> None:
    compute = Recorder()
    # A delay far beyond the test's timeout: the request must not wait for company.
    async with running(compute, max_delay_s=3600, instances=instances) as batcher:
        assert await batcher.submit([("alone", 1, 0)]) == [("done", "alone")]
        assert await batcher.submit([("next", 1, 0)]) == [("done", "next")]
        # A request of several chunks is still one request: it does not wait for itself.
        chunks = [(i, 1, 0) for i in range(20)]
        assert await batcher.submit(chunks) == [("done", i) for i in range(20)]
    assert compute.batches[:2] == [["alone"], ["next"]]


async def test_a_preferred_size_sends_early() -> None:
    compute = Recorder()
    # A delay far beyond the test's timeout: only the preferred size can send the batch.
    async with running(compute, max_delay_s=3600, preferred_batch_sizes=[4]) as batcher:
        results = await asyncio.gather(*(batcher.submit([(i, 1, 0)]) for i in range(4)))
    assert results == [[("done", i)] for i in range(4)]


async def test_a_full_queue_refuses_and_recovers() -> None:
    compute = Recorder()
    compute.gate.clear()  # the first batch blocks in compute; the rest queue up
    async with running(compute, max_batch_size=2, max_queue_size=4) as batcher:
        first = [asyncio.ensure_future(batcher.submit([(i, 1, 0)])) for i in range(2)]
        await queue_empty(batcher)
        queued = [asyncio.ensure_future(batcher.submit([(i, 1, 0)])) for i in range(2, 6)]
        await asyncio.sleep(0)
        assert batcher.depth == 4
        with pytest.raises(QueueFull):
            await batcher.submit([("one too many", 1, 0)])
        compute.gate.set()
        await asyncio.gather(*first, *queued)
        assert await batcher.submit([("later", 1, 0)]) == [("done", "later")]
    assert "one too many" not in compute.computed


async def test_an_expired_request_is_dropped_before_compute_and_counted() -> None:
    compute = Recorder()
    compute.gate.clear()
    expired: list[int] = []
    hooks = BatchHooks(expired=expired.append)
    async with running(compute, max_batch_size=1, hooks=hooks) as batcher:
        blocker = asyncio.ensure_future(batcher.submit([("blocker", 1, 0)]))
        await queue_empty(batcher)
        late = asyncio.ensure_future(
            batcher.submit([("late", 1, 0)], deadline=time.monotonic() + 0.01)
        )
        await asyncio.sleep(0.05)  # its deadline passes while the blocker computes
        compute.gate.set()
        await blocker
        with pytest.raises(DeadlineExpired):
            await late
    assert "late" not in compute.computed
    assert expired == [1]


async def test_cancelled_callers_do_not_break_the_others() -> None:
    compute = Recorder()
    compute.gate.clear()  # nothing completes before the cancellations
    async with running(compute, max_batch_size=4) as batcher:
        calls = [asyncio.ensure_future(batcher.submit([(i, 1, 0)])) for i in range(100)]
        await queue_empty_of_first_batch(batcher, 96)  # one batch in compute, the rest queued
        for call in calls[::2]:
            call.cancel()
        compute.gate.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        # The batcher is still healthy afterwards.
        assert await batcher.submit([("after", 1, 0)]) == [("done", "after")]
    for i, result in enumerate(results):
        if i % 2:
            assert result == [("done", i)]
        else:
            assert isinstance(result, asyncio.CancelledError)
    # Cancelled requests that were still queued were never computed: of the even ones,
    # only those in the first batch, already in compute when cancelled.
    assert [p for p in compute.computed if isinstance(p, int) and p % 2 == 0] == [0, 2]


@pytest.mark.parametrize("instances", [1, 2])
async def test_one_bad_input_fails_only_its_own_request(instances: int) -> None:
    compute = Recorder(fail_on="poison")
    async with running(compute, max_delay_s=0.05, instances=instances) as batcher:
        results = await asyncio.gather(
            batcher.submit([("a", 1, 0)]),
            batcher.submit([("poison", 1, 0)]),
            batcher.submit([("b", 1, 0), ("c", 1, 0)]),
            return_exceptions=True,
        )
    assert results[0] == [("done", "a")]
    assert isinstance(results[1], ComputeFailed)
    assert "Gemm" not in str(results[1])  # graph internals stay in the log
    assert results[2] == [("done", "b"), ("done", "c")]
    assert len(compute.batches[0]) == 4  # they were batched together first


async def test_text_batches_keep_to_the_token_budget_and_group_similar_lengths() -> None:
    compute = Recorder()
    compute.gate.clear()
    lengths = [4, 60, 5, 58, 6, 61, 4, 57, 5, 59, 6, 60] * 3
    async with running(compute, max_batch_size=8, max_batch_tokens=200) as batcher:
        blocker = asyncio.ensure_future(batcher.submit([("blocker", 1, 1)]))
        await queue_empty(batcher)
        calls = [
            asyncio.ensure_future(batcher.submit([((i, n), 1, n)])) for i, n in enumerate(lengths)
        ]
        await asyncio.sleep(0.01)
        compute.gate.set()
        await blocker
        results = await asyncio.gather(*calls)
    assert [r[0][1] for r in results] == [(i, n) for i, n in enumerate(lengths)]
    for batch in compute.batches[1:]:
        sizes = [n for _, n in batch]
        assert len(batch) <= 8
        assert len(batch) * max(sizes) <= 200
        # Short and long texts are not padded to each other.
        assert max(sizes) < 10 or min(sizes) > 50, batch
    assert max(len(b) for b in compute.batches[1:]) == 8  # short texts fill whole batches


@pytest.mark.parametrize("instances", [1, 2])
async def test_drain_waits_for_what_was_accepted_then_refuses_new_work(instances: int) -> None:
    compute = Recorder(delay=0.02)
    async with running(compute, instances=instances) as batcher:
        pending = [asyncio.ensure_future(batcher.submit([(i, 1, 0)])) for i in range(5)]
        await asyncio.sleep(0)
        assert await batcher.drain(5.0)
        assert all(p.done() and not p.exception() for p in pending)
        with pytest.raises(BatcherClosed):
            await batcher.submit([("late", 1, 0)])


# -- tenants -------------------------------------------------------------------------------------


async def test_a_flooding_tenant_is_refused_and_pushed_out_while_another_is_served() -> None:
    compute = Recorder()
    compute.gate.clear()
    refused: list[str] = []
    hooks = BatchHooks(refused=refused.append)
    async with running(compute, max_batch_size=2, max_queue_size=8, hooks=hooks) as batcher:
        blocker = asyncio.ensure_future(batcher.submit([("blocker", 1, 0)], tenant="flood"))
        await queue_empty(batcher)  # in compute, held at the gate
        flood = [
            asyncio.ensure_future(batcher.submit([(f"f{i}", 1, 0)], tenant="flood"))
            for i in range(8)
        ]
        await asyncio.sleep(0)
        assert batcher.depth == 8
        with pytest.raises(QueueFull) as full:
            await batcher.submit([("f8", 1, 0)], tenant="flood")
        assert full.value.reason == FULL
        quiet = [
            asyncio.ensure_future(batcher.submit([(f"q{i}", 1, 0)], tenant="quiet"))
            for i in range(3)
        ]
        await asyncio.sleep(0)
        assert (batcher.depth, batcher.tenants) == (8, 2)
        # Each quiet request pushed out the flood's youngest, and only that one.
        for call in flood[:-3]:
            assert not call.done()
        for call in flood[-3:]:
            with pytest.raises(QueueFull) as pushed:
                await call
            assert pushed.value.reason == PUSHED_OUT
        compute.gate.set()
        assert await asyncio.gather(*quiet) == [[("done", f"q{i}")] for i in range(3)]
        await asyncio.gather(blocker, *flood[:-3])
    assert refused == [FULL, PUSHED_OUT, PUSHED_OUT, PUSHED_OUT]
    # Batches alternate between the two tenants (deficit round robin), the flood's oldest
    # first; what was pushed out never ran.
    assert compute.batches == [
        ["blocker"],
        ["f0", "q0"],
        ["f1", "q1"],
        ["f2", "q2"],
        ["f3", "f4"],
    ]


async def test_another_tenant_s_text_goes_in_the_next_batch_behind_a_text_flood() -> None:
    compute = Recorder()
    compute.gate.clear()
    options = {"max_batch_size": 8, "max_batch_tokens": 200, "max_queue_size": 1000}
    async with running(compute, **options) as batcher:
        blocker = asyncio.ensure_future(batcher.submit([("blocker", 1, 1)], tenant="flood"))
        await queue_empty(batcher)
        flood = [
            asyncio.ensure_future(
                batcher.submit([((r, c), 1, 20) for c in range(50)], tenant="flood")
            )
            for r in range(4)
        ]
        await asyncio.sleep(0)
        quiet = asyncio.ensure_future(batcher.submit([("quiet", 1, 22)], tenant="quiet"))
        await asyncio.sleep(0)
        compute.gate.set()
        assert await quiet == [("done", "quiet")]
        await asyncio.gather(blocker, *flood)
    assert "quiet" in compute.batches[1]
    assert all(len(b) <= 8 for b in compute.batches)


async def test_the_queue_reports_its_depth_and_how_many_tenants_wait() -> None:
    compute = Recorder()
    compute.gate.clear()
    reports: list[tuple[int, int]] = []
    hooks = BatchHooks(queued=lambda depth, tenants: reports.append((depth, tenants)))
    async with running(compute, max_batch_size=4, hooks=hooks) as batcher:
        blocker = asyncio.ensure_future(batcher.submit([("blocker", 1, 0)], tenant="a"))
        await queue_empty(batcher)
        calls = [
            asyncio.ensure_future(batcher.submit([(t, 2, 0)], tenant=t)) for t in ("a", "b", "c")
        ]
        await asyncio.sleep(0)
        assert (batcher.depth, batcher.tenants) == (6, 3)
        compute.gate.set()
        await asyncio.gather(blocker, *calls)
    assert reports[:5] == [(1, 1), (0, 0), (2, 1), (4, 2), (6, 3)]
    assert reports[-1] == (0, 0)


# -- instances -----------------------------------------------------------------------------------


class Held:
    """A model kind whose compute holds every batch until `gate` is set, counting how many
    are inside at once."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entries = threading.Semaphore(0)
        self.lock = threading.Lock()
        self.inside = 0
        self.most = 0
        self.batches: list[list[Any]] = []

    async def prepare(self, payloads: list[Any]) -> None:
        pass

    def compute(self, payloads: list[Any]) -> list[Any]:
        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
            self.batches.append(list(payloads))
        self.entries.release()
        try:
            assert self.gate.wait(10)
            if "poison" in payloads:
                raise RuntimeError("node Gemm_3: bad input")
            return [("done", p) for p in payloads]
        finally:
            with self.lock:
                self.inside -= 1

    async def entered(self, batches: int) -> None:
        """Until `batches` more batches have entered compute."""
        for _ in range(batches):
            assert await asyncio.to_thread(self.entries.acquire, timeout=10)


@pytest.mark.parametrize("instances", [1, 2, 3])
async def test_as_many_batches_compute_at_once_as_there_are_instances(instances: int) -> None:
    kind = Held()
    async with running(kind, max_batch_size=1, instances=instances) as batcher:
        calls = [asyncio.ensure_future(batcher.submit([(i, 1, 0)])) for i in range(6)]
        await kind.entered(instances)
        # Every instance holds a batch; the loop waits for one and forms no more.
        await queue_empty_of_first_batch(batcher, 6 - instances)
        assert kind.inside == instances
        kind.gate.set()
        assert await asyncio.gather(*calls) == [[("done", i)] for i in range(6)]
    assert kind.most == instances
    assert sorted(p for b in kind.batches for p in b) == list(range(6))


async def test_a_lone_request_goes_at_once_to_a_free_instance_while_another_computes() -> None:
    kind = Held()
    # A delay far beyond the test's timeout: the second request must not wait for company.
    async with running(kind, max_delay_s=3600, instances=2) as batcher:
        first = asyncio.ensure_future(batcher.submit([("first", 1, 0)]))
        await kind.entered(1)
        second = asyncio.ensure_future(batcher.submit([("second", 1, 0)]))
        await kind.entered(1)
        kind.gate.set()
        assert await first == [("done", "first")]
        assert await second == [("done", "second")]
    assert kind.batches == [["first"], ["second"]]


@pytest.mark.parametrize("instances", [1, 2])
async def test_close_fails_batches_in_compute_and_queued_then_waits_for_the_session(
    instances: int,
) -> None:
    kind = Held()
    batcher: Batcher[Any, Any] = Batcher(
        kind,
        name="test",
        max_batch_size=1,
        max_delay_s=0.005,
        max_queue_size=100,
        instances=instances,
    )
    batcher.start()
    calls = [asyncio.ensure_future(batcher.submit([(i, 1, 0)])) for i in range(4)]
    await kind.entered(instances)
    closing = asyncio.ensure_future(batcher.close())
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, BatcherClosed) for r in results)
    # The batches still in the session hold `close` until they finish.
    assert not closing.done()
    kind.gate.set()
    await closing
    assert kind.inside == 0
    assert len(kind.batches) == instances  # nothing queued was computed


async def test_drain_waits_for_batches_on_every_instance() -> None:
    kind = Held()
    async with running(kind, max_batch_size=1, instances=2) as batcher:
        calls = [asyncio.ensure_future(batcher.submit([(i, 1, 0)])) for i in range(3)]
        await kind.entered(2)
        draining = asyncio.ensure_future(batcher.drain(30.0))
        await asyncio.sleep(0)
        with pytest.raises(BatcherClosed):
            await batcher.submit([("late", 1, 0)])
        assert not draining.done()
        kind.gate.set()
        assert await draining
        assert await asyncio.gather(*calls) == [[("done", i)] for i in range(3)]


async def test_a_failing_batch_is_isolated_while_another_instance_computes() -> None:
    kind = Held()
    async with running(kind, max_batch_size=4, max_delay_s=3600, instances=2) as batcher:
        # While the blocker computes, the next batch goes once whole (4 rows): a, poison, b+c.
        blocker = asyncio.ensure_future(batcher.submit([("blocker", 1, 0)]))
        await kind.entered(1)
        batch = [
            asyncio.ensure_future(batcher.submit(chunks))
            for chunks in ([("a", 1, 0)], [("poison", 1, 0)], [("b", 1, 0), ("c", 1, 0)])
        ]
        await kind.entered(1)
        kind.gate.set()
        results = await asyncio.gather(*batch, return_exceptions=True)
        assert await blocker == [("done", "blocker")]
    assert results[0] == [("done", "a")]
    assert isinstance(results[1], ComputeFailed)
    assert results[2] == [("done", "b"), ("done", "c")]
    assert ["a", "poison", "b", "c"] in kind.batches  # batched together first
    assert ["poison"] in kind.batches  # then each request alone
