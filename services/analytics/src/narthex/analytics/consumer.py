"""The stream consumer: a consumer group per stream, ack after commit, dead consumers' work
claimed, consumed entries trimmed.

Each replica reads with a consumer name of its own. A batch is decoded, applied to the store
in one transaction (idempotent by event id), and only then acknowledged: a replica killed at
any point leaves its entries pending, and another replica (or itself, restarted under a new
name) claims them with `XAUTOCLAIM` once they have been idle for `claim_idle_seconds`. A
failure to apply or to acknowledge re-reads this consumer's own pending entries first.

Trimming never removes an entry some group has not acknowledged: the stream is cut with
`XTRIM MINID` at the oldest entry still pending in any group, or (none pending) at the last
one delivered, whichever is older across groups.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError
from sqlalchemy.exc import SQLAlchemyError

from narthex.analytics.events import entry_documents
from narthex.analytics.metrics import ConsumerMetrics
from narthex.analytics.store import Applied

log = structlog.get_logger("narthex.analytics.consumer")

T = TypeVar("T")
Entry = tuple[bytes, dict[bytes, bytes]]
# How often the lag gauge is read from Redis (XINFO GROUPS): not once per round.
_LAG_INTERVAL_S = 1.0
# Consumers that hold nothing and have not read for this many claim periods are removed.
_FORGET_IDLE_PERIODS = 10


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def _id(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class StreamConsumer(Generic[T]):
    def __init__(
        self,
        redis: Redis,
        stream: str,
        group: str,
        *,
        decode: Callable[[dict[str, Any]], T],
        apply: Callable[[Sequence[T]], Awaitable[Applied]],
        metrics: ConsumerMetrics,
        name: str | None = None,
        batch: int = 500,
        block_ms: int = 1000,
        claim_idle_seconds: float = 30.0,
        claim_interval_seconds: float = 5.0,
        trim_interval_seconds: float = 10.0,
        retry_seconds: float = 0.5,
        min_round_seconds: float = 0.0,
    ) -> None:
        self.redis = redis
        self.stream = stream
        self.group = group
        self.name = name or consumer_name()
        self._decode = decode
        self._apply = apply
        self.batch = batch
        self.block_ms = block_ms
        self.claim_idle_ms = int(claim_idle_seconds * 1000)
        self.claim_interval = claim_interval_seconds
        self.trim_interval = trim_interval_seconds
        self.retry_seconds = retry_seconds
        # A round that found less than a full batch waits out the rest of this before the
        # next: each transaction's fixed cost is shared by more events (at most this much
        # later), instead of one round per producer write.
        self.min_round_seconds = min_round_seconds
        self._lag = metrics.lag.labels(stream)
        self._applied = metrics.applied.labels(stream)
        self._duplicate = metrics.duplicate.labels(stream)
        self._invalid = metrics.invalid.labels(stream)
        self._claimed = metrics.claimed.labels(stream)
        self._group_ready = False
        self.healthy = False

    async def ensure_group(self) -> None:
        try:
            # From the stream's start: events written before the first replica ever ran
            # are counted too.
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def run(self) -> None:
        """Consume until cancelled; every fault is logged and retried."""
        last_claim = last_trim = last_lag = float("-inf")
        own_pending = True  # this name's pending entries first (after a failure, there are)
        failing = False
        while True:
            try:
                if not self._group_ready:
                    await self.ensure_group()
                now = time.monotonic()
                if now - last_claim >= self.claim_interval:
                    last_claim = now
                    await self.claim()
                if now - last_trim >= self.trim_interval:
                    last_trim = now
                    await self.trim()
                if own_pending:
                    entries = await self._read("0", block=False)
                    own_pending = bool(entries)
                else:
                    entries = await self._read(">", block=True)
                if entries:
                    await self.handle(entries)
                    if len(entries) < self.batch and self.min_round_seconds:
                        rest = now + self.min_round_seconds - time.monotonic()
                        if rest > 0:
                            await asyncio.sleep(rest)
                if now - last_lag >= _LAG_INTERVAL_S:
                    last_lag = now
                    await self.update_lag()
                if failing:
                    log.info("consuming again", stream=self.stream, consumer=self.name)
                failing = False
                self.healthy = True
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, SQLAlchemyError) as exc:
                if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                    self._group_ready = False  # Redis lost its data: the group is made anew
                if not failing:
                    log.warning(
                        "consumer round failed; retrying",
                        stream=self.stream,
                        consumer=self.name,
                        error=repr(exc)[:300],
                    )
                failing = True
                self.healthy = False
                own_pending = True
                await asyncio.sleep(self.retry_seconds)

    async def _read(self, start: str, *, block: bool) -> list[Entry]:
        reply = await self.redis.xreadgroup(
            self.group,
            self.name,
            {self.stream: start},
            count=self.batch,
            block=self.block_ms if block else None,
        )
        if not reply:
            return []
        # RESP2: [[stream, [(id, fields), ...]]]; RESP3: {stream: [[(id, fields), ...]]}
        raw: Any = reply
        if isinstance(raw, dict):
            (value,) = raw.values()
            entries = value[0] if value and isinstance(value[0], list) else value
        else:
            entries = raw[0][1]
        # An entry deleted while pending comes back with no fields: nothing to count.
        return [(entry_id, fields or {}) for entry_id, fields in entries]

    async def handle(self, entries: Sequence[Entry]) -> Applied:
        records: list[T] = []
        invalid = 0
        for entry_id, fields in entries:
            documents = entry_documents(fields)
            if documents is None:
                invalid += 1
                log.warning("invalid event entry", stream=self.stream, entry=str(entry_id))
                continue
            for document in documents:
                try:
                    if not isinstance(document, dict):
                        raise ValueError("not an object")
                    records.append(self._decode(document))
                except ValueError as exc:
                    invalid += 1
                    log.warning(
                        "invalid event", stream=self.stream, entry=str(entry_id), field=str(exc)
                    )
        applied = await self._apply(records) if records else Applied(0, 0)
        # Only now, after the commit: a crash before this line re-delivers the batch,
        # and the store recognises what it already counted.
        await self.redis.xack(self.stream, self.group, *[entry_id for entry_id, _ in entries])
        self._applied.inc(applied.applied)
        self._duplicate.inc(applied.duplicates)
        self._invalid.inc(invalid)
        return applied

    async def claim(self) -> int:
        """Take over entries idle in other consumers' pending lists; apply them."""
        claimed = 0
        start = "0-0"
        for _ in range(100):  # bounded: a huge backlog is taken over a round at a time
            reply = await self.redis.xautoclaim(
                self.stream,
                self.group,
                self.name,
                min_idle_time=self.claim_idle_ms,
                start_id=start,
                count=self.batch,
            )
            start_raw, entries = reply[0], reply[1]
            entries = [(entry_id, fields or {}) for entry_id, fields in entries]
            if entries:
                claimed += len(entries)
                self._claimed.inc(len(entries))
                await self.handle(entries)
            start = start_raw.decode() if isinstance(start_raw, bytes) else str(start_raw)
            if start == "0-0":
                break
        if claimed:
            log.info("claimed pending events", stream=self.stream, consumer=self.name, n=claimed)
        return claimed

    async def trim(self) -> int:
        """Cut the stream below what every group has acknowledged; forget idle consumers."""
        groups = await self.redis.xinfo_groups(self.stream)
        if not groups:
            return 0
        floor: tuple[int, int] | None = None
        for group in groups:
            name = group["name"]
            if int(group["pending"]):
                summary = await self.redis.xpending(self.stream, name)
                oldest = _id(summary["min"])
            else:
                oldest = _id(group["last-delivered-id"])
            floor = oldest if floor is None else min(floor, oldest)
            if name in (self.group, self.group.encode()):
                await self._forget_idle_consumers()
        assert floor is not None
        if floor == (0, 0):
            return 0
        # Exact: a stream trimmed every few seconds holds little, and exact trimming is
        # what lets the stream's length be read as the backlog.
        trimmed = await self.redis.xtrim(
            self.stream, minid=f"{floor[0]}-{floor[1]}", approximate=False
        )
        await self.update_lag()
        return int(trimmed)

    async def _forget_idle_consumers(self) -> None:
        idle_ms = self.claim_idle_ms * _FORGET_IDLE_PERIODS
        for consumer in await self.redis.xinfo_consumers(self.stream, self.group):
            name = consumer["name"]
            name = name.decode() if isinstance(name, bytes) else name
            if name != self.name and not int(consumer["pending"]) and consumer["idle"] > idle_ms:
                await self.redis.xgroup_delconsumer(self.stream, self.group, name)

    async def update_lag(self) -> int | None:
        for group in await self.redis.xinfo_groups(self.stream):
            if group["name"] not in (self.group, self.group.encode()):
                continue
            undelivered = group.get("lag")
            if undelivered is None:  # Redis cannot tell (entries deleted mid-stream)
                return None
            lag = int(undelivered) + int(group["pending"])
            self._lag.set(lag)
            return lag
        return None
