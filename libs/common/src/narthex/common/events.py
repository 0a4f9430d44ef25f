"""Producers that never block: a bounded in-process buffer, fair across tenants, written to
Redis Streams in batches.

A producer (the gateway's usage events, inference's prediction events) calls `emit()`, which
only appends to its tenant's lane: no I/O, no await. A background task takes up to `batch`
events at a time and writes them as one stream entry (a JSON array, one `XADD`): at the edge's
request rates, a command per event would cost the producer, Redis and the consumer more than
the events themselves. While Redis is down the events wait in the buffer, up to `capacity`
of them, so memory is bounded and the request path is never slowed by an outage. A write that
fails after Redis may have stored it is retried: the consumer is idempotent by event id, so a
duplicate costs nothing.

Fair when full. The buffer is shared by every tenant, so with one FIFO and one bound, a tenant
flooding during an outage would fill it and every other tenant's events would be refused:
their usage records lost because of someone else. So each tenant has its own lane (a deque,
its events in order), and as in inference's fair queue: a tenant alone may fill the whole
buffer, but when it is full,
- an event from a tenant holding fewer events than the tenant holding the most still gets
  in, pushing out that tenant's youngest event (`events_dropped{reason="evicted"}`): the
  youngest, as a plain bound would refuse the newest; the oldest are next to be written;
- an event from a tenant holding the most (or as many) is refused (`reason="full"`): it is
  the one to back off.
Only the tenant holding the most ever loses events to another's, and one holding less than
an even share always gets in: over an outage the buffer tends to an even split among the
tenants that emit, and a flood costs the flooder its own events, not anyone else's. Who
holds the most is looked up only when the buffer is full (a heap kept while it stays full),
so the common emit is an append.

A write in flight is never disturbed: `flush_once` takes the oldest events of each lane (an
even share of the batch per tenant, the rest to those with more, so that a light tenant's
events go out in the next entry) and removes them only once `XADD` succeeded; until then
they are the lane's in-flight head, which eviction never touches: it takes from the tail,
and if all the heaviest lane holds is in flight, the emit is refused as full instead (no
tenant then holds more than a batch, and the write under way is about to make room).

Counts add up: every `emit()` is either `events_enqueued` or `events_dropped{reason="full"}`;
every enqueued event ends as `events_written`, still `events_buffered`,
`events_dropped{reason="evicted"}` (pushed out for a lighter tenant's event), or
`events_dropped{reason="shutdown"}` (not written within the grace period at close).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from types import TracebackType
from typing import Any, Self

import orjson
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.asyncio import Redis
from redis.exceptions import RedisError

__all__ = [
    "DATA_FIELD",
    "PREDICTION_STREAM",
    "USAGE_STREAM",
    "EventBuffer",
    "EventMetrics",
    "event_buffers",
    "new_event_id",
    "stream_name",
]

log = structlog.get_logger("narthex.events")

# Stream names under a prefix; each stream is one key (one slot on a cluster).
USAGE_STREAM = "usage"
PREDICTION_STREAM = "predictions"
# Each stream entry is one field holding a JSON array of events (each with its `id`).
DATA_FIELD = "d"
FULL = "full"
EVICTED = "evicted"
SHUTDOWN = "shutdown"


def stream_name(prefix: str, kind: str) -> str:
    return f"{prefix}:{kind}"


def new_event_id() -> str:
    return uuid.uuid4().hex


class EventMetrics:
    """The producer's counters, one set per registry (names agreed with the dashboards)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.enqueued = Counter(
            "events_enqueued", "Events accepted into the buffer.", ["stream"], registry=registry
        )
        self.written = Counter(
            "events_written", "Events written to their Redis stream.", ["stream"], registry=registry
        )
        self.dropped = Counter(
            "events_dropped",
            "Events lost before reaching Redis: buffer full, pushed out, or left at shutdown.",
            ["stream", "reason"],
            registry=registry,
        )
        self.buffered = Gauge(
            "events_buffered", "Events waiting in the buffer.", ["stream"], registry=registry
        )


class _Lane:
    """One tenant's buffered events, oldest first; the first `inflight` are being written."""

    __slots__ = ("events", "inflight", "tenant")

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.events: deque[bytes] = deque()
        self.inflight = 0


class EventBuffer:
    """One stream's bounded buffer and its writer task (`async with` runs the writer)."""

    def __init__(
        self,
        redis: Redis,
        stream: str,
        metrics: EventMetrics,
        *,
        capacity: int = 100_000,
        batch: int = 500,
        linger_seconds: float = 0.05,
        retry_seconds: float = 0.5,
        close_grace_seconds: float = 2.0,
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.capacity = capacity
        self.batch = batch
        self.linger_seconds = linger_seconds
        self.retry_seconds = retry_seconds
        self.close_grace_seconds = close_grace_seconds
        # Lanes with events, by tenant; in the order the writer serves them next (a lane it
        # served goes to the back), so that with more tenants than a batch holds, all turn.
        self._lanes: dict[str, _Lane] = {}
        self._size = 0  # events in all lanes
        # While the buffer is full: lanes by events held, most first (negated), for pushing
        # out. Lazy, as the fair queue's: an entry is current only if it still counts what
        # its lane holds; a lane that holds less is re-filed when its entry comes to the top.
        # Emptied whenever events are written (then the buffer is not full, and lanes grow
        # unfiled until it is full again): rebuilt when it is needed and empty.
        self._heavy: list[tuple[int, int, _Lane]] = []
        self._filings = itertools.count()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._enqueued = metrics.enqueued.labels(stream)
        self._written = metrics.written.labels(stream)
        self._full = metrics.dropped.labels(stream, FULL)
        self._evicted = metrics.dropped.labels(stream, EVICTED)
        self._shutdown = metrics.dropped.labels(stream, SHUTDOWN)
        metrics.buffered.labels(stream).set_function(lambda: self._size)
        self.written = 0
        self.dropped = 0  # every reason: refused, pushed out, left at shutdown
        self.evicted = 0

    def emit(self, event: Mapping[str, Any], *, tenant: str) -> bool:
        """Queue one event (a JSON object with an `id`) of `tenant`'s; False if it was
        refused. Never blocks."""
        if self._size >= self.capacity:
            return self._crowd(event, tenant)
        lane = self._lanes.get(tenant)
        if lane is None:
            lane = self._lanes[tenant] = _Lane(tenant)
        lane.events.append(orjson.dumps(event))
        self._size += 1
        self._enqueued.inc()
        if not self._wakeup.is_set():
            self._wakeup.set()
        return True

    def _crowd(self, event: Mapping[str, Any], tenant: str) -> bool:
        """`emit` into a full buffer: in, if `tenant` holds fewer events than the tenant
        holding the most, whose youngest event makes room; otherwise refused."""
        lane = self._lanes.get(tenant)
        held = len(lane.events) if lane is not None else 0
        victim = self._heaviest() if self._size else None
        # A lane's in-flight events are not its to give (the write's success removes them
        # by count): if the heaviest has nothing else, nobody holds more than a batch, and
        # the write under way is about to make room.
        if victim is None or len(victim.events) <= held or len(victim.events) <= victim.inflight:
            self._full.inc()
            self.dropped += 1
            return False
        victim.events.pop()
        if not victim.events:
            del self._lanes[victim.tenant]
        self._evicted.inc()
        self.evicted += 1
        self.dropped += 1
        if lane is None:
            lane = self._lanes[tenant] = _Lane(tenant)
        lane.events.append(orjson.dumps(event))
        self._enqueued.inc()
        self._file(lane)
        return True

    def _file(self, lane: _Lane) -> None:
        heapq.heappush(self._heavy, (-len(lane.events), next(self._filings), lane))
        if len(self._heavy) > 2 * len(self._lanes) + 64:  # drop stale entries, amortised
            self._refile()

    def _refile(self) -> None:
        filings = self._filings
        self._heavy = [(-len(o.events), next(filings), o) for o in self._lanes.values()]
        heapq.heapify(self._heavy)

    def _heaviest(self) -> _Lane:
        """The lane holding the most (some lane holds something)."""
        while True:
            if not self._heavy:  # emptied by a write since the buffer was last full
                self._refile()
            heavy = self._heavy
            held, _, lane = heavy[0]
            if self._lanes.get(lane.tenant) is not lane:
                heapq.heappop(heavy)  # the lane has left
            elif -held != len(lane.events):  # it holds less than when filed: file it again
                heapq.heapreplace(heavy, (-len(lane.events), next(self._filings), lane))
            else:
                return lane

    @property
    def pending(self) -> int:
        return self._size

    def _clear(self) -> None:
        self._lanes.clear()
        self._heavy.clear()
        self._size = 0

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run(), name=f"events:{self.stream}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # A last chance for what is buffered, bounded: shutdown must not hang on Redis.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.close_grace_seconds):
                while self._size:
                    if not await self.flush_once():
                        break
        left = self._size
        if left:
            self._shutdown.inc(left)
            self.dropped += left
            log.warning("events dropped at shutdown", stream=self.stream, events=left)
            self._clear()

    async def _run(self) -> None:
        failing = False
        while True:
            if not self._size:
                self._wakeup.clear()
                await self._wakeup.wait()
                # A moment for more events to join this entry: every entry costs the
                # producer, Redis and each consumer a round of work, so at the edge's rates
                # an entry should carry many events; what this delays is only analytics.
                await asyncio.sleep(self.linger_seconds)
            if await self.flush_once():
                if failing:
                    log.info("event stream writable again", stream=self.stream)
                failing = False
                continue
            if not failing:
                log.warning(
                    "event stream not writable; buffering", stream=self.stream, events=self.pending
                )
            failing = True
            await asyncio.sleep(self.retry_seconds)

    def _take(self) -> tuple[list[_Lane], list[bytes]]:
        """Up to `batch` events, the oldest of each lane, an even share of the batch per
        lane and what some do not use to the others; marked in flight. The lanes they come
        from, in order."""
        taken: list[_Lane] = []
        events: list[bytes] = []
        room = self.batch
        lanes: Iterable[_Lane] = self._lanes.values()
        active = len(self._lanes)
        while room and active:
            share = max(1, room // active)
            more: list[_Lane] = []
            for lane in lanes:
                start = lane.inflight
                count = min(share, len(lane.events) - start, room)
                events.extend(itertools.islice(lane.events, start, start + count))
                if not start:
                    taken.append(lane)
                lane.inflight = start + count
                room -= count
                if not room:
                    break
                if len(lane.events) > lane.inflight:
                    more.append(lane)
            lanes, active = more, len(more)
        return taken, events

    async def flush_once(self) -> bool:
        """Write up to `batch` events; True if they were written (or nothing was waiting).
        One writer at a time (the writer task, then `__aexit__`)."""
        if not self._size:
            return True
        taken, events = self._take()
        entry = b"[" + b",".join(events) + b"]"
        written = False
        try:
            await self.redis.xadd(self.stream, {DATA_FIELD: entry})
            written = True
        except (RedisError, OSError) as exc:
            # Some of them may be in the stream already: they go again, and the consumer
            # ignores the second copy by event id.
            log.debug("event write failed", stream=self.stream, error=repr(exc))
        finally:
            if not written:  # failed or cancelled: they are the lanes' again, evictable
                for lane in taken:
                    lane.inflight = 0
        if not written:
            return False
        lanes = self._lanes
        for lane in taken:
            queued = lane.events
            for _ in range(lane.inflight):
                queued.popleft()
            lane.inflight = 0
            # Served: to the back of the order (or gone, if empty).
            del lanes[lane.tenant]
            if queued:
                lanes[lane.tenant] = lane
        count = len(events)
        self._size -= count
        self._heavy.clear()  # no longer full: rebuilt when it is full again
        self._written.inc(count)
        self.written += count
        return True


def now() -> float:
    """Event time: wall clock seconds (events are bucketed by UTC hour)."""
    return time.time()


@contextlib.asynccontextmanager
async def event_buffers(
    url: str,
    prefix: str,
    kinds: tuple[str, ...],
    registry: CollectorRegistry | None,
    **options: Any,
) -> AsyncIterator[dict[str, EventBuffer]]:
    """A buffer per stream kind on one Redis client; each one's writer runs inside the block.

    The client connects lazily: a producer starts, and serves, with Redis away."""
    redis = Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    metrics = EventMetrics(registry)
    try:
        async with contextlib.AsyncExitStack() as stack:
            buffers = {
                kind: await stack.enter_async_context(
                    EventBuffer(redis, stream_name(prefix, kind), metrics, **options)
                )
                for kind in kinds
            }
            yield buffers
    finally:
        await redis.aclose()
