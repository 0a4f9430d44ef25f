"""The event producer: never blocks, waits out a Redis outage in its buffer, counts its drops,
and stays fair across tenants when the buffer is full."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from narthex.common.events import EventBuffer, EventMetrics
from tests.support.platform import PrivateRedis


def counter(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name + "_total", labels) or 0.0


def stream_ids(entries: Any) -> list[str]:
    return [event["id"] for _, fields in entries for event in orjson.loads(fields[b"d"])]


def of(tenant: str, ids: list[str]) -> list[str]:
    """`tenant`'s event ids (each id starts with its tenant's name), in the order given."""
    return [i for i in ids if i.rstrip("0123456789") == tenant]


class FakeRedis:
    """Just `xadd`, for the buffer's bookkeeping: records each entry's event ids; while
    `down`, fails as an unreachable Redis does; while `gate` is not set, the write waits
    (in flight) after setting `started`."""

    def __init__(self) -> None:
        self.entries: list[list[str]] = []
        self.down = False
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()

    async def xadd(self, stream: str, fields: Mapping[str, bytes]) -> bytes:
        self.started.set()
        await self.gate.wait()
        if self.down:
            raise RedisConnectionError("Redis is away")
        self.entries.append([event["id"] for event in orjson.loads(fields["d"])])
        return b"0-1"

    @property
    def ids(self) -> list[str]:
        return [i for entry in self.entries for i in entry]


def fake_buffer(fake: FakeRedis, registry: CollectorRegistry, **options: Any) -> EventBuffer:
    redis: Any = fake
    return EventBuffer(redis, STREAM, EventMetrics(registry), **options)


STREAM = "narthex-test:events:usage"


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

    ids = stream_ids(entries)
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


async def test_a_flooding_tenant_cannot_crowd_out_a_quiet_one(tmp_path: Path) -> None:
    """While Redis is away a flood fills the buffer; a quiet tenant's events still get in,
    each pushing out the flood's youngest, and once Redis is back all of the quiet tenant's
    events are in the stream, with the flood's oldest."""
    server = PrivateRedis(tmp_path)
    server.start()
    registry = CollectorRegistry()
    redis = Redis.from_url(server.url, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        async with EventBuffer(
            redis, STREAM, EventMetrics(registry), capacity=50, batch=20, retry_seconds=0.05
        ) as buffer:
            server.stop()
            flood = [buffer.emit({"id": f"flood{i}"}, tenant="flood") for i in range(80)]
            assert flood.count(True) == 50  # alone, it may fill the buffer; then refused
            quiet = [buffer.emit({"id": f"quiet{i}"}, tenant="quiet") for i in range(10)]
            assert all(quiet)  # each one pushed out the flood's youngest
            # The flood holds the most (40 to 10): it is the one refused.
            assert not any(buffer.emit({"id": "flood-more"}, tenant="flood") for _ in range(5))
            assert buffer.pending == 50
            await asyncio.sleep(0.3)  # the writer tries and fails meanwhile

            server.start()
            await wait_until_written(buffer, 50)
        entries: Any = await redis.xrange(STREAM)
    finally:
        await redis.aclose()
        server.stop()

    ids = stream_ids(entries)
    assert of("quiet", ids) == [f"quiet{i}" for i in range(10)]
    assert of("flood", ids) == [f"flood{i}" for i in range(40)]
    assert len(ids) == 50
    # The quiet tenant's events go out in the first entry: a batch is shared evenly.
    assert of("quiet", stream_ids(entries[:1])) == [f"quiet{i}" for i in range(10)]
    # Counts add up: 95 emits = 60 enqueued + 35 refused; 60 = 50 written + 10 pushed out.
    assert counter(registry, "events_enqueued", stream=STREAM) == 60
    assert counter(registry, "events_dropped", stream=STREAM, reason="full") == 35
    assert counter(registry, "events_written", stream=STREAM) == 50
    assert counter(registry, "events_dropped", stream=STREAM, reason="evicted") == 10
    assert counter(registry, "events_dropped", stream=STREAM, reason="shutdown") == 0
    assert registry.get_sample_value("events_buffered", {"stream": STREAM}) == 0
    assert (buffer.written, buffer.evicted, buffer.dropped) == (50, 10, 45)


async def test_a_tenant_alone_fills_the_buffer_and_a_full_one_tends_to_an_even_split() -> None:
    registry = CollectorRegistry()
    fake = FakeRedis()
    fake.down = True
    async with fake_buffer(fake, registry, capacity=12, batch=20, retry_seconds=0.05) as buffer:
        # Alone, a tenant may use all of it: nobody else wants the room.
        accepted = [buffer.emit({"id": f"a{i}"}, tenant="a") for i in range(15)]
        assert accepted == [True] * 12 + [False] * 3
        assert buffer.pending == 12
        # Others get in while they hold fewer than the tenant holding the most.
        assert all(buffer.emit({"id": f"b{i}"}, tenant="b") for i in range(4))  # a 8, b 4
        assert all(buffer.emit({"id": f"c{i}"}, tenant="c") for i in range(2))  # a 6, c 2
        assert buffer.emit({"id": "b4"}, tenant="b")  # b 5 < a 6: a 5
        assert not buffer.emit({"id": "b5"}, tenant="b")  # as many as a: refused
        assert not buffer.emit({"id": "a12"}, tenant="a")
        assert buffer.pending == 12

        fake.down = False
        await wait_until_written(buffer, 12)

    ids = fake.ids
    assert of("a", ids) == [f"a{i}" for i in range(5)]  # its oldest
    assert of("b", ids) == [f"b{i}" for i in range(5)]
    assert of("c", ids) == ["c0", "c1"]
    assert counter(registry, "events_enqueued", stream=STREAM) == 12 + 4 + 2 + 1
    assert counter(registry, "events_dropped", stream=STREAM, reason="evicted") == 7
    assert counter(registry, "events_dropped", stream=STREAM, reason="full") == 3 + 2
    assert counter(registry, "events_written", stream=STREAM) == 12


async def test_eviction_never_touches_a_write_in_flight() -> None:
    """The events of an entry being written are not pushed out: when the write succeeds,
    exactly they leave the buffer, and nothing unwritten is lost with them."""
    registry = CollectorRegistry()
    fake = FakeRedis()
    buffer = fake_buffer(fake, registry, capacity=10, batch=8)
    for i in range(10):
        assert buffer.emit({"id": f"a{i}"}, tenant="a")
    fake.gate.clear()
    write = asyncio.create_task(buffer.flush_once())
    await fake.started.wait()  # a0..a7 are in flight
    # b pushes out a's youngest while a holds more, but only what is not in flight: a9, a8.
    accepted = [buffer.emit({"id": f"b{i}"}, tenant="b") for i in range(6)]
    assert accepted == [True, True, False, False, False, False]
    assert buffer.pending == 10
    fake.gate.set()
    assert await write

    assert fake.entries == [[f"a{i}" for i in range(8)]]
    assert buffer.pending == 2
    assert await buffer.flush_once()
    assert fake.entries[1:] == [["b0", "b1"]]
    assert buffer.pending == 0
    assert counter(registry, "events_enqueued", stream=STREAM) == 12
    assert counter(registry, "events_written", stream=STREAM) == 10
    assert counter(registry, "events_dropped", stream=STREAM, reason="evicted") == 2
    assert counter(registry, "events_dropped", stream=STREAM, reason="full") == 4


@pytest.mark.parametrize("ending", ["fails", "cancelled"])
async def test_a_write_that_does_not_succeed_gives_its_events_back(ending: str) -> None:
    """An entry whose write fails (or is cancelled, as at shutdown) is no longer in flight:
    its events are evictable again, and the next write starts from each lane's oldest."""
    registry = CollectorRegistry()
    fake = FakeRedis()
    fake.down = True
    buffer = fake_buffer(fake, registry, capacity=10, batch=8)
    for i in range(10):
        assert buffer.emit({"id": f"a{i}"}, tenant="a")
    fake.gate.clear()
    write = asyncio.create_task(buffer.flush_once())
    await fake.started.wait()
    assert [buffer.emit({"id": f"b{i}"}, tenant="b") for i in range(3)] == [True, True, False]
    if ending == "fails":
        fake.gate.set()
        assert not await write
    else:
        write.cancel()
        with pytest.raises(asyncio.CancelledError):
            await write
        fake.gate.set()
    assert fake.entries == []
    # Nothing in flight now: b gets in until it holds as many as a.
    assert [buffer.emit({"id": f"b{i}"}, tenant="b") for i in range(2, 6)] == [True] * 3 + [False]
    assert buffer.pending == 10

    fake.down = False
    assert await buffer.flush_once()
    assert await buffer.flush_once()
    assert of("a", fake.ids) == [f"a{i}" for i in range(5)]
    assert of("b", fake.ids) == [f"b{i}" for i in range(5)]
    assert buffer.pending == 0
    assert counter(registry, "events_written", stream=STREAM) == 10
    assert counter(registry, "events_dropped", stream=STREAM, reason="evicted") == 5
    assert counter(registry, "events_dropped", stream=STREAM, reason="full") == 2


async def test_with_more_tenants_than_a_batch_holds_every_tenant_takes_its_turn() -> None:
    registry = CollectorRegistry()
    fake = FakeRedis()
    buffer = fake_buffer(fake, registry, batch=2)
    for tenant in "abc":
        for i in range(2):
            assert buffer.emit({"id": f"{tenant}{i}"}, tenant=tenant)
    for _ in range(3):
        assert await buffer.flush_once()
    # A served tenant goes to the back: c is not left waiting behind a and b.
    assert fake.entries == [["a0", "b0"], ["c0", "a1"], ["b1", "c1"]]


async def test_counts_add_up_whatever_the_interleaving() -> None:
    """Emits from tenants of very different rates, against writes that start, succeed or
    fail in between (a seeded random schedule): nothing is written twice or out of its
    tenant's order, a refusal comes only from a full buffer, and the counts add up."""
    rng = random.Random(7)
    registry = CollectorRegistry()
    fake = FakeRedis()
    buffer = fake_buffer(fake, registry, capacity=24, batch=16)
    weights = {"a": 8, "b": 4, "c": 1, "d": 1}
    sent = dict.fromkeys(weights, 0)
    accepted = refused = 0
    write: asyncio.Task[bool] | None = None
    for _ in range(3_000):
        step = rng.random()
        if step < 0.9:
            tenant = rng.choices(list(weights), list(weights.values()))[0]
            full = buffer.pending >= buffer.capacity
            if buffer.emit({"id": f"{tenant}{sent[tenant]}"}, tenant=tenant):
                accepted += 1
            else:
                assert full
                refused += 1
            sent[tenant] += 1
        elif write is None:
            if not buffer.pending:
                continue  # nothing to write: flush_once would not call xadd
            fake.down = rng.random() < 0.3
            fake.gate.clear()
            fake.started.clear()
            write = asyncio.create_task(buffer.flush_once())
            await fake.started.wait()
        else:
            fake.gate.set()
            await write
            write = None
        assert buffer.pending <= buffer.capacity
        assert accepted == buffer.written + buffer.evicted + buffer.pending
    if write is not None:
        fake.gate.set()
        await write
    fake.down = False
    while buffer.pending:
        assert await buffer.flush_once()

    ids = fake.ids
    assert len(set(ids)) == len(ids)
    for tenant in weights:
        mine = [int(i[1:]) for i in of(tenant, ids)]
        assert mine == sorted(mine)
    assert buffer.evicted > 0
    assert len(ids) + buffer.evicted == accepted
    assert counter(registry, "events_enqueued", stream=STREAM) == accepted
    assert counter(registry, "events_dropped", stream=STREAM, reason="full") == refused
    assert counter(registry, "events_dropped", stream=STREAM, reason="evicted") == buffer.evicted
    assert counter(registry, "events_written", stream=STREAM) == len(ids)
