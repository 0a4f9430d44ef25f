"""The event producer: never blocks, waits out a Redis outage in its buffer, counts its drops."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from narthex.common.events import EventBuffer, EventMetrics
from tests.support.platform import PrivateRedis


def counter(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name + "_total", labels) or 0.0


async def wait_until_written(buffer: EventBuffer, count: int) -> None:
    for _ in range(1_000):  # 20 s at most
        if buffer.written >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{buffer.written} of {count} events written")


async def test_events_wait_out_an_outage_and_the_overflow_is_counted(tmp_path: Path) -> None:
    # Append-only, as `narthex up` runs it: a restart keeps what was written before.
    server = PrivateRedis(tmp_path, ["--appendonly", "yes"])
    server.start()
    registry = CollectorRegistry()
    redis = Redis.from_url(server.url, socket_timeout=1.0, socket_connect_timeout=1.0)
    stream = "narthex-test:events:usage"
    try:
        async with EventBuffer(
            redis, stream, EventMetrics(registry), capacity=50, batch=20, retry_seconds=0.05
        ) as buffer:
            for i in range(30):
                assert buffer.emit({"id": f"a{i}"}, tenant="a")
            await wait_until_written(buffer, 30)

            server.stop()
            accepted = [buffer.emit({"id": f"b{i}"}, tenant="a") for i in range(80)]
            await asyncio.sleep(0.3)  # the writer tries and fails meanwhile
            assert accepted.count(True) == 50  # the buffer's bound, the rest refused
            assert buffer.pending == 50

            server.start()
            await wait_until_written(buffer, 80)
        entries: Any = await redis.xrange(stream)
    finally:
        await redis.aclose()
        server.stop()

    ids = [event["id"] for _, fields in entries for event in orjson.loads(fields[b"d"])]
    assert ids == [f"a{i}" for i in range(30)] + [f"b{i}" for i in range(50)]
    assert counter(registry, "events_enqueued", stream=stream) == 80
    assert counter(registry, "events_written", stream=stream) == 80
    assert counter(registry, "events_dropped", stream=stream, reason="full") == 30
    assert registry.get_sample_value("events_buffered", {"stream": stream}) == 0


async def test_emit_does_not_wait_for_redis(tmp_path: Path) -> None:
    """With Redis away (nothing listening), emit returns at once and close gives up after
    its grace period, counting what was left as dropped at shutdown."""
    registry = CollectorRegistry()
    server = PrivateRedis(tmp_path)  # never started: its port refuses connections
    redis = Redis.from_url(server.url, socket_timeout=0.2, socket_connect_timeout=0.2)
    stream = "narthex-test:events:x"
    try:
        async with EventBuffer(
            redis, stream, EventMetrics(registry), close_grace_seconds=0.2, retry_seconds=0.05
        ) as buffer:
            for i in range(10):
                assert buffer.emit({"id": str(i)}, tenant="a")
    finally:
        await redis.aclose()
    assert buffer.dropped == 10
    assert counter(registry, "events_dropped", stream=stream, reason="shutdown") == 10
