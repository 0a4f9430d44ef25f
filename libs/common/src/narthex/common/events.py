"""Producers that never block: a bounded in-process buffer, written to Redis Streams in batches.

A producer (the gateway's usage events, inference's prediction events) calls `emit()`, which
only appends to a deque: no I/O, no await. A background task takes up to `batch` events at a
time and writes them as one stream entry (a JSON array, one `XADD`): at the edge's request
rates, a command per event would cost the producer, Redis and the consumer more than the
events themselves. While Redis is down the events wait
in the buffer; once it is full, new events are refused and counted as dropped, so memory is
bounded and the request path is never slowed by an outage. A write that fails after Redis may
have stored it is retried: the consumer is idempotent by event id, so a duplicate costs nothing.

Counts add up: every `emit()` is either `events_enqueued` or `events_dropped{reason="full"}`;
every enqueued event ends as `events_written`, still `events_buffered`, or
`events_dropped{reason="shutdown"}` (not written within the grace period at close).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Mapping
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
            "Events lost before reaching Redis: buffer full, or left at shutdown.",
            ["stream", "reason"],
            registry=registry,
        )
        self.buffered = Gauge(
            "events_buffered", "Events waiting in the buffer.", ["stream"], registry=registry
        )


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
        self._events: deque[bytes] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._enqueued = metrics.enqueued.labels(stream)
        self._written = metrics.written.labels(stream)
        self._full = metrics.dropped.labels(stream, FULL)
        self._shutdown = metrics.dropped.labels(stream, SHUTDOWN)
        metrics.buffered.labels(stream).set_function(lambda: len(self._events))
        self.written = 0
        self.dropped = 0

    def emit(self, event: Mapping[str, Any]) -> bool:
        """Queue one event (a JSON object with an `id`); False if it was dropped. Never blocks."""
        if len(self._events) >= self.capacity:
            self._full.inc()
            self.dropped += 1
            return False
        self._events.append(orjson.dumps(event))
        self._enqueued.inc()
        if not self._wakeup.is_set():
            self._wakeup.set()
        return True

    @property
    def pending(self) -> int:
        return len(self._events)

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
                while self._events:
                    if not await self.flush_once():
                        break
        left = len(self._events)
        if left:
            self._shutdown.inc(left)
            self.dropped += left
            log.warning("events dropped at shutdown", stream=self.stream, events=left)
            self._events.clear()

    async def _run(self) -> None:
        failing = False
        while True:
            if not self._events:
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

    async def flush_once(self) -> bool:
        """Write up to `batch` events; True if they were written (or nothing was waiting)."""
        count = min(self.batch, len(self._events))
        if not count:
            return True
        entry = b"[" + b",".join(self._events[i] for i in range(count)) + b"]"
        try:
            await self.redis.xadd(self.stream, {DATA_FIELD: entry})
        except (RedisError, OSError) as exc:
            # Some of them may be in the stream already: they go again, and the consumer
            # ignores the second copy by event id.
            log.debug("event write failed", stream=self.stream, error=repr(exc))
            return False
        for _ in range(count):
            self._events.popleft()
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
