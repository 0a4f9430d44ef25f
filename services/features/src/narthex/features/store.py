"""Online feature store: each account's `AccountState` and the event ids it has counted.

An entity is an account of one tenant: state and counted ids are kept per (tenant,
account), so two tenants with the same account id never share state or event ids.

Two backends with the same semantics, `RedisFeatureStore` (shared by every replica; a
single Redis or a Redis Cluster) and `MemoryFeatureStore` (one process); both run every
event through `apply_events`, which calls `AccountState.apply` from
`narthex.transactions.aggregates`, the code that builds the training set. Nothing here
computes an aggregate.

Out-of-order events are counted as `aggregates.py` defines: an event still inside a
bucket the state keeps counts exactly as if it had arrived in order; one too old for
every window (more than 7 d behind the account's newest event) changes nothing and is
reported `stale` (`apply` returned False). Features read at an instant at or after every
event applied are the same whatever order the events arrived in.

Duplicates: an entity's counted event ids are kept with its state, each with its event's
timestamp, and checked and written in the same atomic step as the state (the dedup scope
is the entity: the same id under two accounts, or two tenants, counts twice). A second
copy, in the same batch or any later one, is reported `duplicate` and changes nothing;
the first copy's content wins. Ids of stale events are not kept (a replay of one is
stale again). An id is kept for `DEDUP_HORIZON_SECONDS` behind the account's newest
event: an event that far behind is stale whatever its id, so forgetting the id cannot
let a replay count twice, and an id kept past that is treated as forgotten, so both
backends answer the same whether or not they have pruned it yet.

Expiry: a state nobody writes to for `RETENTION_SECONDS` reads exactly as `DEFAULTS`
(aggregates.py), so each write sets a time-to-live of that plus a margin, and an idle
account costs nothing.

Redis keys: `<prefix>:{<tenant>:<account>}:state` and `...:seen`. The braces are a hash
tag: an entity's two keys live in one slot, so each script below touches one slot and
runs unchanged on a Redis Cluster. Tenant and account are escaped (`%`, `:`, `{`, `}` as
%XX) so that the tag is exactly the pair, whatever characters an id holds, and no two
pairs share a key.

Redis atomicity: each entity of a batch is read by one script (its state and the batch's
ids' scores, atomically), applied in Python, then written back by one compare-and-set
script: it writes the new state, adds the counted ids and renews both expiries only if
the state is still the one that was read (a revision counter inside the value rules out
ABA). Every entity's calls are pipelined together (on a cluster, one pipeline per node,
in parallel). An entity another writer changed in between is read and applied again, so
concurrent replicas lose no event and count none twice. The Lua only reads, compares and
stores; the aggregates are computed in Python. A batch is atomic per entity, not across
entities: after a failure part of it may be stored, and sending it again is safe
(idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.exceptions import RedisError

from narthex.transactions import AccountState, Transaction
from narthex.transactions.lookup import EntityId

__all__ = [
    "DEDUP_HORIZON_SECONDS",
    "FeatureStore",
    "FeatureStoreError",
    "IngestCounts",
    "MemoryFeatureStore",
    "RedisClient",
    "RedisFeatureStore",
    "apply_events",
    "entity_tag",
    "redis_client",
]

RedisClient = Redis | RedisCluster

# aggregates.py: an event more than 7 d behind the newest one "counts nowhere and changes
# nothing" (its hour is at least the 168 kept hours behind the head's).
DEDUP_HORIZON_SECONDS = 7 * 86_400.0
# Rounds of read-apply-write for the entities whose compare-and-set lost; each round at
# least one contending writer of an entity wins, so this bounds waiting, not progress.
_MAX_ROUNDS = 100


# KEYS: state, seen ids. ARGV: event ids. {state or nil, each id's score or nil}. ZMSCORE
# in slices: Lua's unpack() is bounded by its C stack (~8000 values).
_READ = """
local scores = {}
for i = 1, #ARGV, 1000 do
  local part = redis.call('ZMSCORE', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV)))
  for j = 1, #part do
    scores[#scores + 1] = part[j]
  end
end
return {redis.call('GET', KEYS[1]), scores}
"""

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
    async def ingest(self, tenant: str, events: Sequence[Transaction]) -> IngestCounts:
        """Count `events` (already validated) in the states of `tenant`'s accounts, once each."""
        ...

    async def states(self, entities: Sequence[EntityId]) -> list[AccountState | None]:
        """Each (tenant, account)'s state, None for an unknown (or expired) one."""
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
    interleave inside an entity.
    """

    _SWEEP_SECONDS = 60.0

    def __init__(self, *, ttl_seconds: float, clock: Callable[[], float] = time.time) -> None:
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self._entities: dict[EntityId, _Entry] = {}
        self._next_sweep = clock() + self._SWEEP_SECONDS

    def _live(self, entity: EntityId, now: float) -> _Entry | None:
        entry = self._entities.get(entity)
        if entry is not None and entry.expires_at <= now:
            del self._entities[entity]
            return None
        return entry

    async def ingest(self, tenant: str, events: Sequence[Transaction]) -> IngestCounts:
        now = self.clock()
        if now >= self._next_sweep:
            self._sweep(now)
        total = IngestCounts()
        for account, group in by_account(events).items():
            entity = (tenant, account)
            entry = self._live(entity, now)
            state = AccountState() if entry is None else entry.state
            counts, counted = apply_events(state, {} if entry is None else entry.seen, group)
            total += counts
            if not counted:
                continue  # nothing changed: like Redis, no write and no renewed expiry
            if entry is None:
                entry = self._entities[entity] = _Entry(state, {}, now)
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
        for entity in [e for e, entry in self._entities.items() if entry.expires_at <= now]:
            del self._entities[entity]
        self._next_sweep = now + self._SWEEP_SECONDS

    async def states(self, entities: Sequence[EntityId]) -> list[AccountState | None]:
        now = self.clock()
        out: list[AccountState | None] = []
        for entity in entities:
            entry = self._live(entity, now)
            # A copy: the caller may not change what is stored.
            out.append(None if entry is None else AccountState.from_dict(entry.state.to_dict()))
        return out

    async def ping(self) -> None:
        return None

    def __len__(self) -> int:
        """Entities held, expired ones not yet swept included."""
        return len(self._entities)


# -- Redis -------------------------------------------------------------------------------------


@asynccontextmanager
async def redis_client(
    url: str, *, cluster: bool = False, max_connections: int, wait_seconds: float
) -> AsyncIterator[RedisClient]:
    """A client with bounded connections; `cluster`: a Redis Cluster that `url` is a node of.

    `wait_seconds` bounds connecting and each answer. A single Redis's pool makes callers
    wait up to that long for a free connection; redis-py's cluster client has no waiting
    pool, so there a call finding `max_connections` (per node) busy fails at once.
    """
    client: RedisClient
    if cluster:
        client = RedisCluster.from_url(
            url,
            max_connections=max_connections,
            socket_timeout=wait_seconds,
            socket_connect_timeout=wait_seconds,
        )
    else:
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


_TAG_ESCAPES = str.maketrans({"%": "%25", ":": "%3A", "{": "%7B", "}": "%7D"})


def _tag_part(value: str) -> str:
    # Four scans in C beat translate() on the ids that need no escape (nearly all).
    if "%" in value or ":" in value or "{" in value or "}" in value:
        return value.translate(_TAG_ESCAPES)
    return value


def entity_tag(tenant: str, account: str) -> str:
    """`{tenant:account}`, escaped: a hash tag naming exactly this pair."""
    return f"{{{_tag_part(tenant)}:{_tag_part(account)}}}"


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


# (script, keys, arguments)
_Call = tuple[str, tuple[str, str], list[Any]]


class RedisFeatureStore:
    """Entities under `prefix`: `<prefix>:{<tenant>:<account>}:state` (the state, JSON) and
    `...:seen` (a sorted set: counted event id -> event timestamp).

    `max_in_flight`: calls to Redis at once, the others wait. For a cluster client, whose
    nodes refuse a connection beyond their `max_connections` rather than wait (and redis-py
    then tears down connections other calls are using): at most one per node per call.
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: str,
        ttl_seconds: int,
        on_conflict: Callable[[], None] = lambda: None,
        max_in_flight: int | None = None,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            # A brace in the prefix would become the hash tag: every key in one slot, or
            # (`{}`) an entity's two keys in different slots.
            raise ValueError(f"a Redis key prefix must not contain braces: {prefix!r}")
        self.client = client
        self.prefix = prefix
        self.ttl_seconds = ttl_seconds
        self.on_conflict = on_conflict
        # A cluster has no cross-slot MGET: redis-py's non-atomic one splits it by slot.
        self._mget = client.mget_nonatomic if isinstance(client, RedisCluster) else client.mget
        self._in_flight = (
            contextlib.nullcontext() if max_in_flight is None else asyncio.Semaphore(max_in_flight)
        )

    def state_key(self, tenant: str, account: str) -> str:
        return f"{self.prefix}:{entity_tag(tenant, account)}:state"

    def seen_key(self, tenant: str, account: str) -> str:
        return f"{self.prefix}:{entity_tag(tenant, account)}:seen"

    def _keys(self, tenant: str, account: str) -> tuple[str, str]:
        base = f"{self.prefix}:{entity_tag(tenant, account)}"
        return f"{base}:state", f"{base}:seen"

    async def ingest(self, tenant: str, events: Sequence[Transaction]) -> IngestCounts:
        groups = by_account(events)
        pending = list(groups)
        total = IngestCounts()
        try:
            for round_ in range(_MAX_ROUNDS):
                if round_:
                    # Jittered, growing: contending replicas stop colliding in lockstep.
                    await asyncio.sleep(random.uniform(0, 0.001 * min(round_, 20)))
                counts, pending = await self._round(tenant, pending, groups)
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
        self, tenant: str, accounts: list[str], groups: Mapping[str, list[Transaction]]
    ) -> tuple[IngestCounts, list[str]]:
        """One read-apply-write of `accounts`: counts of those written, those that lost."""
        keys = [self._keys(tenant, account) for account in accounts]
        replies = await self._run(
            [
                (_READ, pair, [tx.event_id for tx in groups[account]])
                for account, pair in zip(accounts, keys, strict=True)
            ]
        )

        done = IngestCounts()
        writes: list[_Call] = []
        written_counts: list[tuple[str, IngestCounts]] = []
        for account, pair, (raw, scores) in zip(accounts, keys, replies, strict=True):
            rev, state = (0, AccountState()) if raw is None else _decode(raw, pair[0])
            seen = {
                tx.event_id: float(score)
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
            writes.append((_COMPARE_AND_SET, pair, args))
            written_counts.append((account, counts))
        written = await self._run(writes) if writes else []

        lost: list[str] = []
        for (account, counts), ok in zip(written_counts, written, strict=True):
            if ok == 1:
                done += counts
            else:
                lost.append(account)
        return done, lost

    async def _run(self, calls: Sequence[_Call]) -> list[Any]:
        """Every call, pipelined (on a cluster, one pipeline per node, in parallel). EVAL,
        not EVALSHA: redis-py's cluster pipeline refuses EVALSHA, and the server caches
        the compiled script by its hash either way."""
        async with self._in_flight, self.client.pipeline(transaction=False) as pipe:
            for script, keys, args in calls:
                pipe.eval(script, 2, *keys, *args)
            replies: list[Any] = await pipe.execute()
        return replies

    async def states(self, entities: Sequence[EntityId]) -> list[AccountState | None]:
        if not entities:
            return []
        keys = [self.state_key(tenant, account) for tenant, account in entities]
        try:
            async with self._in_flight:
                raws = await self._mget(keys)
        except RedisError as exc:
            raise FeatureStoreError(f"Redis: {exc!r}") from exc
        return [
            None if raw is None else _decode(raw, key)[1]
            for key, raw in zip(keys, raws, strict=True)
        ]

    async def ping(self) -> None:
        try:
            async with self._in_flight:
                await self.client.ping()
        except RedisError as exc:
            raise FeatureStoreError(f"Redis: {exc!r}") from exc
