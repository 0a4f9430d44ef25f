"""The dynamic batcher of one loaded model version: a bounded queue, batches, compute off the loop.

A request is split into chunks (rows of a tensor request, up to `max_batch_size` each; one
chunk per text for text models), and chunks from many requests form a batch. A batch goes
to the session when it is full, when it reaches a preferred size, or `max_delay` after its
oldest chunk arrived. Text batches are formed by a token budget around the oldest text,
from texts of similar length, so that padding stays small. Before compute, chunks of
requests that were cancelled, failed, or are past their deadline are dropped. If a batch
fails, each request in it is run alone, so that one bad input fails only its own request.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import structlog

__all__ = [
    "BatchHooks",
    "Batcher",
    "BatcherClosed",
    "ComputeFailed",
    "DeadlineExpired",
    "QueueFull",
]

log = structlog.get_logger("narthex.inference.batcher")

# Tokens of padding a short text may take on top of doubling its length (CLS/SEP and such).
_LENGTH_SLACK = 8

P = TypeVar("P")  # what one chunk carries into compute
R = TypeVar("R")  # what compute gives back per chunk


class QueueFull(Exception):
    """The queue holds `max_queue_size` items already."""


class DeadlineExpired(Exception):
    """The request's deadline passed while it waited; it was dropped before compute."""


class BatcherClosed(Exception):
    """The version is unloading and takes no new work."""


class ComputeFailed(Exception):
    """The model could not run this request's own input (others in its batch did run)."""


@dataclass(slots=True)
class BatchHooks:
    """Where a batcher reports what it does (metrics); every hook is optional."""

    queued: Callable[[int], None] = lambda depth: None  # items waiting, after a change
    batch: Callable[[int, float], None] = lambda size, seconds: None  # items, compute time
    waited: Callable[[float], None] = lambda seconds: None  # one chunk's time in the queue
    expired: Callable[[int], None] = lambda chunks: None  # dropped past their deadline


@dataclass(eq=False, slots=True)
class _Job(Generic[R]):
    future: asyncio.Future[list[R]]
    tenant: str
    deadline: float
    results: list[Any]
    left: int


@dataclass(eq=False, slots=True)
class _Chunk(Generic[P]):
    job: _Job[Any]
    index: int
    payload: P
    rows: int
    tokens: int  # tokens of a text chunk (unpadded); 0 for tensors
    enqueued: float = field(default_factory=time.monotonic)


class Batcher(Generic[P, R]):
    """`submit` chunks of one request, get their results in order.

    `compute(payloads)` runs in a thread of its own (one per batcher, so batches of one
    version never run at once and the session is never re-entered), and returns one
    result per payload.
    """

    def __init__(
        self,
        compute: Callable[[list[P]], list[R]],
        *,
        name: str,
        max_batch_size: int,
        max_delay_s: float,
        max_queue_size: int,
        preferred_batch_sizes: Sequence[int] = (),
        max_batch_tokens: int | None = None,
        hooks: BatchHooks | None = None,
        prepare: Callable[[list[P]], Awaitable[None]] | None = None,
    ) -> None:
        self._compute = compute
        # Async work on a formed batch before compute (one feature lookup for all of it).
        self._prepare = prepare
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_size = max_queue_size
        # Sending early only helps once a preferred size is reached; below the smallest one
        # the batcher waits for more as usual.
        self._early = min((s for s in preferred_batch_sizes if s <= max_batch_size), default=0)
        self.max_batch_tokens = max_batch_tokens
        self._hooks = hooks or BatchHooks()
        self._queue: deque[_Chunk[P]] = deque()
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{name}")
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.in_flight = 0  # submitted requests not answered yet
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def depth(self) -> int:
        """Items waiting for a batch."""
        return self._queued_rows

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"batcher-{self.name}")

    async def submit(
        self,
        chunks: Sequence[tuple[P, int, int]],
        *,
        tenant: str = "",
        deadline: float = float("inf"),
    ) -> list[R]:
        """Queue `(payload, rows, tokens)` chunks of one request of `tenant`; their results,
        in order."""
        if self._closed:
            raise BatcherClosed(f"{self.name} is unloading")
        rows = sum(c[1] for c in chunks)
        if self._queued_rows + rows > self.max_queue_size:
            raise QueueFull(f"{self.name}: {self._queued_rows} items already waiting")
        job: _Job[R] = _Job(
            asyncio.get_running_loop().create_future(),
            tenant,
            deadline,
            [None] * len(chunks),
            len(chunks),
        )
        now = time.monotonic()
        for index, (payload, n, tokens) in enumerate(chunks):
            self._queue.append(_Chunk(job, index, payload, n, tokens, now))
        self._queued_rows += rows
        self._hooks.queued(self._queued_rows)
        self._wakeup.set()
        self.in_flight += 1
        self._idle.clear()
        try:
            return await job.future
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def drain(self, within: float) -> bool:
        """Stop taking work; wait (up to `within` s) until every request is answered."""
        self._closed = True
        try:
            async with asyncio.timeout(within):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for chunk in self._queue:
            if not chunk.job.future.done():
                chunk.job.future.set_exception(BatcherClosed(f"{self.name} was unloaded"))
        self._queue.clear()
        self._queued_rows = 0
        self._executor.shutdown(wait=True)

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._fill()
            batch = self._form()
            if batch:
                await self._execute(batch)

    async def _fill(self) -> None:
        """Wait until a batch is worth sending, or the oldest chunk has waited long enough."""
        due = self._queue[0].enqueued + self.max_delay_s
        while not self._full():
            remaining = due - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                return

    def _full(self) -> bool:
        rows = self._queued_rows
        if rows >= self.max_batch_size or (self._early and rows >= self._early):
            return True
        if self.max_batch_tokens is None:
            return False
        longest = max(c.tokens for c in self._queue)
        return longest * len(self._queue) >= self.max_batch_tokens

    def _live(self, chunk: _Chunk[P], now: float) -> bool:
        job = chunk.job
        if job.future.done():  # cancelled by its caller, or failed in another chunk
            return False
        if now > job.deadline:
            job.future.set_exception(DeadlineExpired("the request's deadline passed in the queue"))
            self._hooks.expired(1)
            return False
        return True

    def _form(self) -> list[_Chunk[P]]:
        now = time.monotonic()
        batch = self._form_text(now) if self.max_batch_tokens is not None else self._form_rows(now)
        self._hooks.queued(self._queued_rows)
        for chunk in batch:
            self._hooks.waited(now - chunk.enqueued)
        return batch

    def _form_rows(self, now: float) -> list[_Chunk[P]]:
        batch: list[_Chunk[P]] = []
        rows = 0
        while self._queue:
            chunk = self._queue[0]
            if not self._live(chunk, now):
                self._queue.popleft()
                self._queued_rows -= chunk.rows
                continue
            if batch and rows + chunk.rows > self.max_batch_size:
                break
            self._queue.popleft()
            self._queued_rows -= chunk.rows
            batch.append(chunk)
            rows += chunk.rows
        return batch

    def _form_text(self, now: float) -> list[_Chunk[P]]:
        assert self.max_batch_tokens is not None
        # Only a window of the queue is considered, so forming stays cheap under load.
        window = min(len(self._queue), 4 * self.max_batch_size)
        candidates: list[_Chunk[P]] = []
        for _ in range(window):
            chunk = self._queue.popleft()
            self._queued_rows -= chunk.rows
            if self._live(chunk, now):
                candidates.append(chunk)
        if not candidates:
            return []
        oldest = candidates[0]
        ordered = sorted(candidates, key=lambda c: c.tokens)
        lo = hi = next(i for i, c in enumerate(ordered) if c is oldest)
        budget, limit = self.max_batch_tokens, self.max_batch_size

        def fits(lo: int, hi: int) -> bool:
            count = hi - lo + 1
            longest, shortest = max(ordered[hi].tokens, 1), ordered[lo].tokens
            # Padding a text to more than about twice its length costs more than running
            # it in a batch of its own.
            similar = longest <= 2 * shortest + _LENGTH_SLACK
            return count <= limit and count * longest <= budget and similar

        # Grow around the oldest text towards whichever neighbour is closer in length.
        while True:
            left = lo - 1 if lo > 0 and fits(lo - 1, hi) else None
            right = hi + 1 if hi + 1 < len(ordered) and fits(lo, hi + 1) else None
            if left is None and right is None:
                break
            if right is None or (
                left is not None
                and oldest.tokens - ordered[left].tokens <= ordered[right].tokens - oldest.tokens
            ):
                lo = left  # type: ignore[assignment]
            else:
                hi = right
        batch = ordered[lo : hi + 1]
        chosen = {id(c) for c in batch}
        # The rest go back in front, in their original order.
        rest = [c for c in candidates if id(c) not in chosen]
        self._queue.extendleft(reversed(rest))
        self._queued_rows += sum(c.rows for c in rest)
        return batch

    async def _execute(self, batch: list[_Chunk[P]]) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            if self._prepare is not None:
                await self._prepare([c.payload for c in batch])
            results = await loop.run_in_executor(
                self._executor, self._compute, [c.payload for c in batch]
            )
        except Exception as exc:
            await self._isolate(batch, exc)
            return
        finally:
            self._hooks.batch(sum(c.rows for c in batch), time.monotonic() - started)
        self._deliver(batch, results)

    def _deliver(self, batch: list[_Chunk[P]], results: list[R]) -> None:
        for chunk, result in zip(batch, results, strict=True):
            job = chunk.job
            if job.future.done():
                continue
            job.results[chunk.index] = result
            job.left -= 1
            if job.left == 0:
                job.future.set_result(job.results)

    async def _isolate(self, batch: list[_Chunk[P]], exc: Exception) -> None:
        jobs: dict[int, list[_Chunk[P]]] = {}
        for chunk in batch:
            jobs.setdefault(id(chunk.job), []).append(chunk)
        if len(jobs) == 1:
            self._fail(batch, exc)
            return
        loop = asyncio.get_running_loop()
        for chunks in jobs.values():
            if chunks[0].job.future.done():
                continue
            try:
                results = await loop.run_in_executor(
                    self._executor, self._compute, [c.payload for c in chunks]
                )
            except Exception as one:
                self._fail(chunks, one)
            else:
                self._deliver(chunks, results)

    def _fail(self, chunks: list[_Chunk[P]], exc: Exception) -> None:
        job = chunks[0].job
        if job.future.done():
            return
        # The model's own message names graph internals; it goes to the log, not the client.
        log.warning("model failed on a request", batcher=self.name, error=str(exc)[:500])
        job.future.set_exception(ComputeFailed("the model could not compute this input"))
