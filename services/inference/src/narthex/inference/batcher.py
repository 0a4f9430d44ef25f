"""The dynamic batcher of one loaded model version: a bounded queue fair across tenants,
batches, compute off the loop.

A request is split into chunks (rows of a tensor request, up to `max_batch_size` each; one
chunk per text for text models), and chunks from many requests form a batch. Which requests
are queued and which chunks make the next batch is decided by the tenant-fair queue
(`fair_queue`: fair-share admission, deficit round robin). A batch goes to a free instance
when enough is queued for a whole batch or a preferred size, `max_delay` after the oldest
queued chunk arrived, or at once when nothing else waits: a lone request does not wait for
company that is not coming. Text batches keep to a token budget and to texts of similar
length, so that padding stays small. Before compute, chunks of requests that were
cancelled, failed, or are past their deadline are dropped. If a batch fails, each request
in it is run alone, so that one bad input fails only its own request.

A version has `instances` runners (its config's `instance_group`): up to that many batches
compute at once, each in a thread of its own, sharing the version's session. The loop forms
a batch whenever a runner is free and waits while all are busy. With one instance, batches
run one after another.

What a batch is run by is the version's model kind (`Kind`; `narthex.inference.kinds`): the
batcher forms batches and hands them over, and knows nothing of what a model needs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import structlog

from narthex.inference.fair_queue import FULL, PUSHED_OUT, Chunk, FairQueue, Job, QueueFull

__all__ = [
    "FULL",
    "PUSHED_OUT",
    "BatchHooks",
    "Batcher",
    "BatcherClosed",
    "ComputeFailed",
    "DeadlineExpired",
    "Kind",
    "QueueFull",
]

log = structlog.get_logger("narthex.inference.batcher")

P = TypeVar("P")  # what one chunk carries into compute
R = TypeVar("R")  # what compute gives back per chunk


class Kind(Protocol[P, R]):
    """What runs a version's batches: its model kind."""

    async def prepare(self, payloads: list[P]) -> None:
        """On the event loop, once per formed batch, before `compute`: the batch's own
        async work (a transaction model's one feature lookup for all of it)."""

    def compute(self, payloads: list[P]) -> list[R]:
        """In the batcher's thread: one result per payload, in order."""


class DeadlineExpired(Exception):
    """The request's deadline passed while it waited; it was dropped before compute."""


class BatcherClosed(Exception):
    """The version is unloading and takes no new work."""


class ComputeFailed(Exception):
    """The model could not run this request's own input (others in its batch did run)."""


@dataclass(slots=True)
class BatchHooks:
    """Where a batcher reports what it does (metrics); every hook is optional. Nothing here
    names a tenant: per-tenant series would be unbounded."""

    # Items waiting and tenants with work waiting, after a change.
    queued: Callable[[int, int], None] = lambda depth, tenants: None
    batch: Callable[[int, float], None] = lambda size, seconds: None  # items, compute time
    waited: Callable[[float], None] = lambda seconds: None  # one chunk's time in the queue
    expired: Callable[[int], None] = lambda chunks: None  # dropped past their deadline
    refused: Callable[[str], None] = lambda reason: None  # a request refused: FULL, PUSHED_OUT
    # Results computed, with the tenant of each chunk (prediction events); on the loop.
    computed: Callable[[list[str], list[Any]], None] = lambda tenants, results: None


class Batcher(Generic[P, R]):
    """`submit` chunks of one request, get their results in order.

    `kind.compute(payloads)` runs in one of `instances` threads (so at most that many
    batches of the version run at once; with one, the session is never re-entered), after
    `kind.prepare(payloads)` on the event loop.
    """

    def __init__(
        self,
        kind: Kind[P, R],
        *,
        name: str,
        max_batch_size: int,
        max_delay_s: float,
        max_queue_size: int,
        preferred_batch_sizes: Sequence[int] = (),
        max_batch_tokens: int | None = None,
        quantum: int | None = None,
        hooks: BatchHooks | None = None,
        clock: Callable[[], float] = time.monotonic,
        instances: int = 1,
    ) -> None:
        if instances < 1:
            raise ValueError(f"instances must be at least 1, not {instances}")
        self._kind = kind
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_size = max_queue_size
        # Sending early only helps once a preferred size is reached; below the smallest one
        # the batcher waits for more as usual.
        self._early = min((s for s in preferred_batch_sizes if s <= max_batch_size), default=0)
        self.max_batch_tokens = max_batch_tokens
        self._hooks = hooks or BatchHooks()
        self._clock = clock  # enqueue times and deadlines; waits are the event loop's
        self._queue: FairQueue[P] = FairQueue(
            capacity=max_queue_size,
            max_batch_size=max_batch_size,
            max_batch_tokens=max_batch_tokens,
            quantum=quantum,
            expire=self._expire,
        )
        self._wakeup = asyncio.Event()
        self.instances = instances
        self._executor = ThreadPoolExecutor(max_workers=instances, thread_name_prefix=f"ort-{name}")
        self._task: asyncio.Task[None] | None = None
        # Batches formed and not finished (one per busy instance), and their tasks when the
        # loop does not await them itself (more than one instance).
        self._running: dict[int, list[Chunk[P]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._freed = asyncio.Event()  # an instance finished its batch
        self._computing = 0  # requests in those batches (per batch: a request in two counts 2)
        self._closed = False
        self.in_flight = 0  # submitted requests not answered yet
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def depth(self) -> int:
        """Items waiting for a batch."""
        return self._queue.rows

    @property
    def tenants(self) -> int:
        """Tenants with items waiting."""
        return self._queue.active

    def on_computed(self, hook: Callable[[list[str], list[Any]], None]) -> None:
        """Report each computed batch's tenants and results to `hook` from now on."""
        self._hooks.computed = hook

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"batcher-{self.name}")

    def check(self, rows: int, *, tenant: str = "") -> None:
        """Raise `QueueFull` (or `BatcherClosed`) if a request of `rows` items from `tenant`
        would be refused now: for work that only an admitted request needs (tokenizing)."""
        if self._closed:
            raise BatcherClosed(f"{self.name} is unloading")
        try:
            self._queue.check(tenant, rows)
        except QueueFull as exc:
            self._hooks.refused(exc.reason)
            raise

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
        job: Job[R] = Job(
            asyncio.get_running_loop().create_future(),
            tenant,
            deadline,
            [None] * len(chunks),
            len(chunks),
        )
        queue = self._queue
        try:
            pushed = queue.admit(job, chunks, self._clock())
        except QueueFull as exc:
            self._hooks.refused(exc.reason)
            raise
        for victim in pushed:
            victim.future.set_exception(
                QueueFull(
                    "pushed out of a full queue for tenants below their share", reason=PUSHED_OUT
                )
            )
            self._hooks.refused(PUSHED_OUT)
        self._hooks.queued(queue.rows, queue.active)
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
        """Stop at once: what is queued or in a batch fails with `BatcherClosed`; a batch
        already in the session finishes there (ONNX Runtime cannot be interrupted) before
        `close` returns, so the session is free to go."""
        self._closed = True
        # Taken before cancelling: a cancelled batch forgets itself on the way out.
        jobs = [c.job for batch in self._running.values() for c in batch]
        tasks = [t for t in (self._task, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for job in jobs + self._queue.clear():
            if not job.future.done():
                job.future.set_exception(BatcherClosed(f"{self.name} was unloaded"))
        # Off the loop: the other models' requests go on while a last batch finishes.
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def _run(self) -> None:
        queue = self._queue
        while True:
            if not queue.rows:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if len(self._running) >= self.instances:
                self._freed.clear()
                await self._freed.wait()
                continue
            # An instance is idle here. With one request in flight besides those computing,
            # nothing else waits: it goes now rather than after the delay.
            if self.in_flight - self._computing > 1:
                await self._fill()
            batch = self._form()
            if not batch:
                continue
            # Taken now, not when the batch's task first runs: the loop goes on at once.
            self._running[id(batch)] = batch
            requests = len({id(c.job) for c in batch})
            self._computing += requests
            if self.instances == 1:
                # The one instance: the loop computes the batch itself, then forms the next.
                await self._execute(batch, requests)
            else:
                execute = self._execute(batch, requests)
                task = asyncio.create_task(execute, name=f"batch-{self.name}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _fill(self) -> None:
        """Wait until a batch is worth sending, or the oldest chunk has waited long enough."""
        queue = self._queue
        due = queue.oldest() + self.max_delay_s
        while not queue.full(self._early):
            remaining = due - self._clock()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                return
            if not queue.rows:
                return

    def _expire(self, job: Job[Any]) -> None:
        job.future.set_exception(DeadlineExpired("the request's deadline passed in the queue"))
        self._hooks.expired(1)

    def _form(self) -> list[Chunk[P]]:
        now = self._clock()
        queue = self._queue
        batch = queue.form(now)
        self._hooks.queued(queue.rows, queue.active)
        for chunk in batch:
            self._hooks.waited(now - chunk.enqueued)
        return batch

    async def _execute(self, batch: list[Chunk[P]], requests: int) -> None:
        """Compute `batch` (of `requests` requests), then free its instance."""
        try:
            await self._compute(batch)
        finally:
            del self._running[id(batch)]
            self._computing -= requests
            self._freed.set()

    async def _compute(self, batch: list[Chunk[P]]) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            payloads = [c.payload for c in batch]
            await self._kind.prepare(payloads)
            results = await loop.run_in_executor(self._executor, self._kind.compute, payloads)
        except Exception as exc:
            await self._isolate(batch, exc)
            return
        finally:
            self._hooks.batch(sum(c.rows for c in batch), time.monotonic() - started)
        self._hooks.computed([c.job.tenant for c in batch], results)
        self._deliver(batch, results)

    def _deliver(self, batch: list[Chunk[P]], results: list[R]) -> None:
        for chunk, result in zip(batch, results, strict=True):
            job = chunk.job
            if job.future.done():
                continue
            job.results[chunk.index] = result
            job.left -= 1
            if job.left == 0:
                job.future.set_result(job.results)

    async def _isolate(self, batch: list[Chunk[P]], exc: Exception) -> None:
        jobs: dict[int, list[Chunk[P]]] = {}
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
                    self._executor, self._kind.compute, [c.payload for c in chunks]
                )
            except Exception as one:
                self._fail(chunks, one)
            else:
                self._hooks.computed([c.job.tenant for c in chunks], results)
                self._deliver(chunks, results)

    def _fail(self, chunks: list[Chunk[P]], exc: Exception) -> None:
        job = chunks[0].job
        if job.future.done():
            return
        # The model's own message names graph internals; it goes to the log, not the client.
        log.warning("model failed on a request", batcher=self.name, error=str(exc)[:500])
        job.future.set_exception(ComputeFailed("the model could not compute this input"))
