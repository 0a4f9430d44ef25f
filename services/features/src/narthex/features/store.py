"""Online feature store: each account's `AccountState` and the event ids it has counted.

Two backends with the same semantics, `RedisFeatureStore` (shared by every replica) and
`MemoryFeatureStore` (one process); both run every event through `apply_events`, which
calls `AccountState.apply` from `narthex.transactions.aggregates`, the code that builds
the training set. Nothing here computes an aggregate.

Out-of-order events are counted as `aggregates.py` defines: an event still inside a
bucket the state keeps counts exactly as if it had arrived in order; one too old for
every window (more than 7 d behind the account's newest event) changes nothing and is
reported `stale` (`apply` returned False). Features read at an instant at or after every
event applied are the same whatever order the events arrived in.

Duplicates: an account's counted event ids are kept with the state, each with its
event's timestamp, and checked and written in the same atomic step as the state (the
dedup scope is the account: the same id under two accounts counts twice). A second
copy, in the same batch or any later one, is reported `duplicate` and changes nothing;
the first copy's content wins. Ids of stale events are not kept (a replay of one is
stale again). An id is kept for `DEDUP_HORIZON_SECONDS` behind the account's newest
event: an event that far behind is stale whatever its id, so forgetting the id cannot
let a replay count twice, and an id kept past that is treated as forgotten, so both
backends answer the same whether or not they have pruned it yet.

Expiry: a state nobody writes to for `RETENTION_SECONDS` reads exactly as `DEFAULTS`
(aggregates.py), so each write sets a time-to-live of that plus a margin, and an idle
account costs nothing.

Redis atomicity: a batch's accounts are read in one MULTI/EXEC (states by MGET, the
batch's ids by ZMSCORE), applied in Python, then written back by one compare-and-set
script per account, all pipelined: the script writes the new state, adds the counted
ids and renews both expiries only if the state is still the one that was read (a
revision counter inside the value rules out ABA). An account another writer changed in
between is read and applied again, so concurrent replicas lose no event and count none
twice. The Lua only compares and stores; the aggregates are computed in Python. A batch
is atomic per account, not across accounts: after a failure part of it may be stored,
and sending it again is safe (idempotent).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from narthex.transactions import AccountState, Transaction

__all__ = [
    "DEDUP_HORIZON_SECONDS",
    "FeatureStore",
    "FeatureStoreError",
    "IngestCounts",
    "MemoryFeatureStore",
    "RedisFeatureStore",
    "apply_events",
    "redis_client",
]

# aggregates.py: an event more than 7 d behind the newest one "counts nowhere and changes
# nothing" (its hour is at least the 168 kept hours behind the head's).
DEDUP_HORIZON_SECONDS = 7 * 86_400.0
# Rounds of read-apply-write for the accounts whose compare-and-set lost; each round at
# least one contending writer of an account wins, so this bounds waiting, not progress.
_MAX_ROUNDS = 100

# KEYS: state, seen ids. ARGV: the state value read ('' when absent), the new value, the
# time-to-live in seconds, the timestamp below which ids are forgotten, then id, timestamp
# pairs. 1 when written, 0 when the state changed since it was read.
_COMPARE_AND_SET = """
local current = redis.call('GET', KEYS[1])
if (current or '') ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
for i = 5, #ARGV, 2 do
  redis.call('ZADD', KEYS[2], ARGV[i + 1], ARGV[i])
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
"""


class FeatureStoreError(Exception):
    """The store could not answer (unreachable, timed out, too contended, bad data)."""


@dataclass(frozen=True, slots=True)
class IngestCounts:
    accepted: int = 0
    duplicates: int = 0
    stale: int = 0

    def __add__(self, other: IngestCounts) -> IngestCounts:
        return IngestCounts(
            self.accepted + other.accepted,
            self.duplicates + other.duplicates,
            self.stale + other.stale,
        )


class FeatureStore(Protocol):
    async def ingest(self, events: Sequence[Transaction]) -> IngestCounts:
        """Count `events` (already validated) in their accounts' states, once each."""
        ...

    async def states(self, accounts: Sequence[str]) -> list[AccountState | None]:
        """Each account's state, None for an unknown (or expired) one; one round trip."""
        ...

    async def ping(self) -> None:
        """Return when the store answers; FeatureStoreError otherwise."""
        ...


def apply_events(
    state: AccountState, seen: Mapping[str, float], events: Iterable[Transaction]
) -> tuple[IngestCounts, dict[str, float]]:
    """Apply one account's events to `state`, in order, skipping duplicates.

    `seen`: the account's kept ids (id -> event timestamp), at least those of `events`.
    Returns the counts and the ids to keep from now on (those of accepted events).
    """
    accepted = duplicates = stale = 0
    in_batch: set[str] = set()
    counted: dict[str, float] = {}
    for tx in events:
        if tx.event_id in in_batch:
            duplicates += 1
            continue
        in_batch.add(tx.event_id)
        kept = seen.get(tx.event_id)
        head = state.last_timestamp
        if kept is not None and head is not None and kept >= head - DEDUP_HORIZON_SECONDS:
            duplicates += 1
        elif state.apply(tx):
            accepted += 1
            counted[tx.event_id] = tx.timestamp
        else:
            stale += 1
    return IngestCounts(accepted, duplicates, stale), counted


def by_account(events: Iterable[Transaction]) -> dict[str, list[Transaction]]:
    """Events grouped by account, each group in the given order."""
    groups: dict[str, list[Transaction]] = {}
    for tx in events:
        groups.setdefault(tx.account_id, []).append(tx)
    return groups


# -- memory ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    state: AccountState
    seen: dict[str, float]
    expires_at: float
    prune_at: int = 64


class MemoryFeatureStore:
    """One process's store: `RedisFeatureStore`'s semantics without Redis (`make run`).

    Each call runs without awaiting, so concurrent tasks of one event loop never
    interleave inside an account.
    """

    _SWEEP_SECONDS = 60.0

    def __init__(self, *, ttl_seconds: float, clock: Callable[[], float] = time.time) -> None:
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self._accounts: dict[str, _Entry] = {}
        self._next_sweep = clock() + self._SWEEP_SECONDS

    def _live(self, account: str, now: float) -> _Entry | None:
        entry = self._accounts.get(account)
        if entry is not None and entry.expires_at <= now:
            del self._accounts[account]
            return None
        return entry

    async def ingest(self, events: Sequence[Transaction]) -> IngestCounts:
        now = self.clock()
        if now >= self._next_sweep:
            self._sweep(now)
        total = IngestCounts()
        for account, group in by_account(events).items():
            entry = self._live(account, now)
            state = AccountState() if entry is None else entry.state
            counts, counted = apply_events(state, {} if entry is None else entry.seen, group)
            total += counts
            if not counted:
                continue  # nothing changed: like Redis, no write and no renewed expiry
            if entry is None:
                entry = self._accounts[account] = _Entry(state, {}, now)
            entry.seen.update(counted)
            entry.expires_at = now + self.ttl_seconds
            if len(entry.seen) >= entry.prune_at:
                self._prune(entry)
        return total

    @staticmethod
    def _prune(entry: _Entry) -> None:
        # Amortized O(1) per event: a pass over the ids each time they have doubled.
        head = entry.state.last_timestamp
        assert head is not None
        floor = head - DEDUP_HORIZON_SECONDS
        entry.seen = {i: t for i, t in entry.seen.items() if t >= floor}
        entry.prune_at = max(64, 2 * len(entry.seen))

    def _sweep(self, now: float) -> None:
        for account in [a for a, e in self._accounts.items() if e.expires_at <= now]:
            del self._accounts[account]
        self._next_sweep = now + self._SWEEP_SECONDS

    async def states(self, accounts: Sequence[str]) -> list[AccountState | None]:
        now = self.clock()
        out: list[AccountState | None] = []
        for account in accounts:
            entry = self._live(account, now)
            # A copy: the caller may not change what is stored.
            out.append(None if entry is None else AccountState.from_dict(entry.state.to_dict()))
        return out

    async def ping(self) -> None:
        return None

    def __len__(self) -> int:
        """Accounts held, expired ones not yet swept included."""
        return len(self._accounts)


# -- Redis -------------------------------------------------------------------------------------


@asynccontextmanager
async def redis_client(
    url: str, *, max_connections: int, wait_seconds: float
) -> AsyncIterator[Redis]:
    """A client with a bounded pool: callers wait for a connection rather than fail.

    `wait_seconds` bounds connecting, each answer, and the wait for a free connection.
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=wait_seconds,
        socket_timeout=wait_seconds,
        socket_connect_timeout=wait_seconds,
    )
    client = Redis.from_pool(pool)  # the client owns the pool: closing it closes the pool
    try:
        yield client
    finally:
        await client.aclose()


def _encode(rev: int, state: AccountState) -> bytes:
    return orjson.dumps({"rev": rev, "state": state.to_dict()})


def _decode(raw: bytes | str, key: str) -> tuple[int, AccountState]:
    try:
        value = orjson.loads(raw)
        rev = value["rev"]
        if isinstance(rev, bool) or not isinstance(rev, int):
            raise TypeError(f"revision {rev!r}")
        return rev, AccountState.from_dict(value["state"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise FeatureStoreError(f"malformed state at {key}: {exc}") from None


class RedisFeatureStore:
    """Accounts under `prefix`: `<prefix>:state:<account>` (the state, JSON) and
    `<prefix>:seen:<account>` (a sorted set: counted event id -> event timestamp)."""

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str,
        ttl_seconds: int,
        on_conflict: Callable[[], None] = lambda: None,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl_seconds = ttl_seconds
        self.on_conflict = on_conflict

    def state_key(self, account: str) -> str:
        return f"{self.prefix}:state:{account}"

    def seen_key(self, account: str) -> str:
        return f"{self.prefix}:seen:{account}"

    async def ingest(self, events: Sequence[Transaction]) -> IngestCounts:
        groups = by_account(events)
        pending = list(groups)
        total = IngestCounts()
        try:
            for round_ in range(_MAX_ROUNDS):
                if round_:
                    # Jittered, growing: contending replicas stop colliding in lockstep.
                    await asyncio.sleep(random.uniform(0, 0.001 * min(round_, 20)))
                counts, pending = await self._round(pending, groups)
                total += counts
                if not pending:
                    return total
                for _ in pending:
                    self.on_conflict()
        except RedisError as exc:
            raise FeatureStoreError(f"Redis: {exc!r}") from exc
        raise FeatureStoreError(
            f"{len(pending)} accounts still contended after {_MAX_ROUNDS} rounds"
        )

    async def _round(
        self, accounts: list[str], groups: Mapping[str, list[Transaction]]
    ) -> tuple[IngestCounts, list[str]]:
        """One read-apply-write of `accounts`: counts of those written, those that lost."""
        async with self.client.pipeline(transaction=True) as read:
            read.mget([self.state_key(a) for a in accounts])
            for account in accounts:
                read.zmscore(self.seen_key(account), [tx.event_id for tx in groups[account]])
            replies = await read.execute()

        done = IngestCounts()
        writes: list[tuple[str, IngestCounts]] = []
        async with self.client.pipeline(transaction=False) as write:
            for account, raw, scores in zip(accounts, replies[0], replies[1:], strict=True):
                rev, state = (
                    (0, AccountState()) if raw is None else _decode(raw, self.state_key(account))
                )
                seen = {
                    tx.event_id: score
                    for tx, score in zip(groups[account], scores, strict=True)
                    if score is not None
                }
                counts, counted = apply_events(state, seen, groups[account])
                if not counted:
                    done += counts  # nothing to write: true of the snapshot read
                    continue
                head = state.last_timestamp
                assert head is not None
                args: list[Any] = [
                    b"" if raw is None else raw,
                    _encode(rev + 1, state),
                    self.ttl_seconds,
                    repr(head - DEDUP_HORIZON_SECONDS),
                ]
                for event_id, timestamp in counted.items():
                    args += (event_id, repr(timestamp))
                write.eval(
                    _COMPARE_AND_SET, 2, self.state_key(account), self.seen_key(account), *args
                )
                writes.append((account, counts))
            written = await write.execute() if writes else []

        lost: list[str] = []
        for (account, counts), ok in zip(writes, written, strict=True):
            if ok == 1:
                done += counts
            else:
                lost.append(account)
        return done, lost

    async def states(self, accounts: Sequence[str]) -> list[AccountState | None]:
        if not accounts:
            return []
        try:
            raws = await self.client.mget([self.state_key(a) for a in accounts])
        except RedisError as exc:
            raise FeatureStoreError(f"Redis: {exc!r}") from exc
        return [
            None if raw is None else _decode(raw, self.state_key(account))[1]
            for account, raw in zip(accounts, raws, strict=True)
        ]

    async def ping(self) -> None:
        try:
            await self.client.ping()
        except RedisError as exc:
            raise FeatureStoreError(f"Redis: {exc!r}") from exc
