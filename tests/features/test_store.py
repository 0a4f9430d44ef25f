"""The feature store contract, on memory, a single Redis and a three-node Redis Cluster."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass

import orjson
import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from narthex.features.store import (
    DEDUP_HORIZON_SECONDS,
    FeatureStore,
    FeatureStoreError,
    IngestCounts,
    MemoryFeatureStore,
    RedisFeatureStore,
    entity_tag,
    redis_client,
)
from narthex.transactions import AccountState, Transaction, simulate
from tests.support.redis import REDIS_URL, RedisScratch, redis_scratch
from tests.support.redis_cluster import (
    ClusterScratch,
    LocalCluster,
    cluster_scratch,
    redis_cluster_fixture,  # noqa: F401 - the `redis_cluster` fixture
)

TENANT = "t_acme"
T0 = 1_790_000_000.0  # 2026-09-21, a Monday
HOUR = 3600.0
DAY = 86_400.0
TTL = 30 * 86_400 + 86_400


class ManualClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Conflicts:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@dataclass
class Backend:
    """A store, a second one on its own connection to the same data, and what is under it."""

    name: str
    store: FeatureStore
    other: FeatureStore
    conflicts: Conflicts
    scratch: RedisScratch | ClusterScratch | None = None


@pytest.fixture(params=["memory", "redis", "cluster"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    conflicts = Conflicts()
    if request.param == "memory":
        store = MemoryFeatureStore(ttl_seconds=TTL)
        yield Backend("memory", store, store, conflicts)
        return
    async with AsyncExitStack() as stack:
        scratch: RedisScratch | ClusterScratch
        if request.param == "cluster":
            cluster: LocalCluster = request.getfixturevalue("redis_cluster")
            scratch = await stack.enter_async_context(cluster_scratch(cluster))
            url = cluster.url
        else:
            scratch = await stack.enter_async_context(redis_scratch())
            url = REDIS_URL
        second = await stack.enter_async_context(
            redis_client(
                url, cluster=request.param == "cluster", max_connections=8, wait_seconds=3.0
            )
        )
        yield Backend(
            request.param,
            RedisFeatureStore(
                scratch.client, prefix=scratch.prefix, ttl_seconds=TTL, on_conflict=conflicts
            ),
            RedisFeatureStore(
                second,
                prefix=scratch.prefix,
                ttl_seconds=TTL,
                on_conflict=conflicts,
                # As the service does on a cluster: calls wait for one of the 8 connections.
                max_in_flight=8 if request.param == "cluster" else None,
            ),
            conflicts,
            scratch,
        )


def tx(
    event_id: str,
    t: float,
    *,
    account: str = "acct1",
    amount: float = 10.0,
    merchant: str = "m1",
    currency: str = "USD",
) -> Transaction:
    return Transaction(
        event_id=event_id,
        account_id=account,
        merchant_id=merchant,
        amount=amount,
        currency=currency,
        timestamp=t,
    )


def replayed(events: Iterable[Transaction]) -> dict[str, AccountState]:
    """The reference: AccountState fed the events, in the order given."""
    states: dict[str, AccountState] = {}
    for event in events:
        states.setdefault(event.account_id, AccountState()).apply(event)
    return states


def mine(*accounts: str) -> list[tuple[str, str]]:
    """`accounts` as entities of TENANT."""
    return [(TENANT, account) for account in accounts]


async def state_of(
    store: FeatureStore, account: str = "acct1", tenant: str = TENANT
) -> AccountState | None:
    (state,) = await store.states([(tenant, account)])
    return state


# -- counting ---------------------------------------------------------------------------------


async def test_features_equal_account_state_fed_the_same_events(backend: Backend) -> None:
    events = [e.transaction for e in simulate(seed=3, accounts=6, days=3)]
    total = IngestCounts()
    for start in range(0, len(events), 40):
        total += await backend.store.ingest(TENANT, events[start : start + 40])
    assert total == IngestCounts(accepted=len(events))

    expected = replayed(events)
    accounts = sorted(expected)
    stored = await backend.store.states(mine(*accounts))
    end = events[-1].timestamp + 60.0
    for account, state in zip(accounts, stored, strict=True):
        assert state == expected[account]
        assert state is not None
        assert state.features(end) == expected[account].features(end)


async def test_unknown_accounts_are_none_in_the_order_asked(backend: Backend) -> None:
    await backend.store.ingest(TENANT, [tx("e1", T0, account="a"), tx("e2", T0, account="b")])
    states = await backend.store.states(mine("b", "nobody", "a", "b"))
    assert [None if s is None else s.last_timestamp for s in states] == [T0, None, T0, T0]
    assert await backend.store.states([]) == []


# -- duplicates -------------------------------------------------------------------------------


async def test_a_batch_sent_three_times_counts_once(backend: Backend) -> None:
    batch = [tx(f"e{i}", T0 + i * 60, account=f"acct{i % 3}") for i in range(12)]
    first = await backend.store.ingest(TENANT, batch)
    again = [await backend.store.ingest(TENANT, batch) for _ in range(2)]

    assert first == IngestCounts(accepted=12)
    assert again == [IngestCounts(duplicates=12)] * 2
    expected = replayed(batch)
    assert await backend.store.states(mine(*sorted(expected))) == [
        expected[a] for a in sorted(expected)
    ]


async def test_duplicates_inside_a_batch_count_once_first_copy_wins(backend: Backend) -> None:
    batch = [
        tx("e1", T0, amount=5.0),
        tx("e2", T0 + 60),
        tx("e1", T0 + 120, amount=999.0),  # same id, other content: a duplicate all the same
        tx("e1", T0, amount=5.0),
    ]
    assert await backend.store.ingest(TENANT, batch) == IngestCounts(accepted=2, duplicates=2)
    assert await state_of(backend.store) == replayed(batch[:2])["acct1"]
    # And across batches.
    assert await backend.store.ingest(
        TENANT, [tx("e2", T0 + 3 * HOUR, amount=7.0)]
    ) == IngestCounts(duplicates=1)
    assert await state_of(backend.store) == replayed(batch[:2])["acct1"]


async def test_thousands_of_events_of_one_account_in_one_batch(backend: Backend) -> None:
    # More ids than one call to Redis's Lua may unpack at once (the read script slices).
    events = [tx(f"e{i}", T0 + i, merchant=f"m{i % 7}") for i in range(2500)]
    assert await backend.store.ingest(TENANT, [*events, *events[:10]]) == IngestCounts(
        accepted=2500, duplicates=10
    )
    assert await backend.store.ingest(TENANT, events) == IngestCounts(duplicates=2500)
    assert await state_of(backend.store) == replayed(events)["acct1"]


async def test_the_same_id_under_two_accounts_counts_twice(backend: Backend) -> None:
    counts = await backend.store.ingest(
        TENANT, [tx("e1", T0, account="a"), tx("e1", T0, account="b")]
    )
    assert counts == IngestCounts(accepted=2)


# -- tenants ----------------------------------------------------------------------------------


async def test_two_tenants_with_the_same_account_id_never_share_state(backend: Backend) -> None:
    mine_events = [tx(f"e{i}", T0 + i * 60, amount=900.0, merchant=f"m{i}") for i in range(5)]
    await backend.store.ingest("t_a", mine_events)
    assert await state_of(backend.store, tenant="t_b") is None

    theirs = [tx("b1", T0 + 30, amount=3.0)]
    assert await backend.store.ingest("t_b", theirs) == IngestCounts(accepted=1)
    assert await state_of(backend.store, tenant="t_a") == replayed(mine_events)["acct1"]
    assert await state_of(backend.store, tenant="t_b") == replayed(theirs)["acct1"]


async def test_the_same_event_id_under_two_tenants_counts_twice(backend: Backend) -> None:
    # Tenant A cannot pre-claim tenant B's event ids: B's real event still counts.
    assert await backend.store.ingest("t_a", [tx("e1", T0, amount=5.0)]) == IngestCounts(accepted=1)
    assert await backend.store.ingest("t_b", [tx("e1", T0, amount=7.0)]) == IngestCounts(accepted=1)
    # Within a tenant, a replay is still a duplicate.
    assert await backend.store.ingest("t_b", [tx("e1", T0)]) == IngestCounts(duplicates=1)
    a, b = await backend.store.states([("t_a", "acct1"), ("t_b", "acct1")])
    assert a == replayed([tx("e1", T0, amount=5.0)])["acct1"]
    assert b == replayed([tx("e1", T0, amount=7.0)])["acct1"]


# Ids that would collide if the key's separator, braces or escape character were taken
# literally: ("a:b", "c") and ("a", "b:c"); "%3A" and ":"; a "}" ending the hash tag early.
TRICKY_TENANTS = ("a", "a:b", "%3A", "{x}", "t}")
TRICKY_ACCOUNTS = ("c", "b:c", ":", "%3A", "}", "{", "{}", "x}y{z", "ü%")


async def test_ids_with_separators_braces_and_escapes_are_distinct_entities(
    backend: Backend,
) -> None:
    entities = [(t, a) for t in TRICKY_TENANTS for a in TRICKY_ACCOUNTS]
    amounts = {entity: float(i + 1) for i, entity in enumerate(entities)}
    for tenant in TRICKY_TENANTS:
        events = [
            tx(f"e{i}", T0, account=account, amount=amounts[tenant, account])
            for i, account in enumerate(TRICKY_ACCOUNTS)
        ]
        assert await backend.store.ingest(tenant, events) == IngestCounts(accepted=len(events))
    states = await backend.store.states(entities)
    for entity, state in zip(entities, states, strict=True):
        assert state is not None
        assert state.features(T0)["amount_sum_24h"] == amounts[entity], entity


def test_an_entitys_keys_share_one_hash_tag_that_is_exactly_the_escaped_pair() -> None:
    store = RedisFeatureStore(Redis(), prefix="p", ttl_seconds=TTL)
    tags = set()
    for tenant in TRICKY_TENANTS:
        for account in TRICKY_ACCOUNTS:
            state, seen = store.state_key(tenant, account), store.seen_key(tenant, account)
            assert key_slot(state.encode()) == key_slot(seen.encode())
            tag = state.removeprefix("p:").removesuffix(":state")
            assert tag == entity_tag(tenant, account)
            # One pair of braces, around the whole pair: Redis hashes exactly it.
            inside = tag.removeprefix("{").removesuffix("}")
            assert tag == "{" + inside + "}"
            assert "{" not in inside
            assert "}" not in inside
            assert inside.count(":") == 1
            tags.add(tag)
    assert len(tags) == len(TRICKY_TENANTS) * len(TRICKY_ACCOUNTS)
    assert entity_tag("t_1", "acct_9") == "{t_1:acct_9}"  # the usual ids are kept as they are


def test_a_prefix_with_a_brace_is_refused() -> None:
    for prefix in ("a{b", "x}", "{}"):
        with pytest.raises(ValueError, match="braces"):
            RedisFeatureStore(Redis(), prefix=prefix, ttl_seconds=TTL)


# -- order ------------------------------------------------------------------------------------


async def test_out_of_order_arrival_reads_as_in_order(backend: Backend) -> None:
    rng = random.Random(7)
    events = [
        tx(f"e{i}", T0 + rng.uniform(0, 6 * DAY), amount=round(rng.uniform(1, 300), 2),
           merchant=f"m{rng.randrange(30)}", currency=rng.choice(["USD", "EUR", "JPY"]))
        for i in range(300)
    ]  # fmt: skip
    shuffled = events[:]
    rng.shuffle(shuffled)
    for start in range(0, len(shuffled), 25):
        await backend.store.ingest(TENANT, shuffled[start : start + 25])

    in_order = replayed(sorted(events, key=lambda e: e.timestamp))["acct1"]
    stored = await state_of(backend.store)
    assert stored is not None
    end = max(e.timestamp for e in events)
    for at in (end, end + 30.0, end + HOUR, end + 2 * DAY):
        assert stored.features(at) == in_order.features(at)


async def test_an_event_too_old_for_every_window_is_stale_and_changes_nothing(
    backend: Backend,
) -> None:
    await backend.store.ingest(TENANT, [tx("new", T0 + 10 * DAY)])
    before = await state_of(backend.store)

    old = [tx("old", T0), tx("old", T0)]
    assert await backend.store.ingest(TENANT, old) == IngestCounts(stale=1, duplicates=1)
    # Its id is not kept: a replay is stale again, never a duplicate.
    assert await backend.store.ingest(TENANT, old[:1]) == IngestCounts(stale=1)
    assert await state_of(backend.store) == before


@pytest.mark.parametrize("head", [T0, T0 + 0.001, T0 + 1799.5, T0 + HOUR - 0.001, 1.8e9 + 12.345])
def test_an_event_beyond_the_dedup_horizon_is_stale_for_account_state(head: float) -> None:
    # What makes forgetting ids that far back safe: aggregates.py refuses such events.
    state = AccountState()
    assert state.apply(tx("head", head))
    assert not state.apply(tx("old", head - DEDUP_HORIZON_SECONDS))
    assert not state.apply(tx("older", head - DEDUP_HORIZON_SECONDS - 0.001))


async def test_an_id_behind_the_horizon_is_forgotten_and_its_replay_is_stale(
    backend: Backend,
) -> None:
    first = [tx(f"e{i}", T0 + i) for i in range(100)]
    await backend.store.ingest(TENANT, first)
    # The head moves 8 days on: the first events are now behind the horizon.
    assert await backend.store.ingest(TENANT, [tx("later", T0 + 8 * DAY)]) == IngestCounts(
        accepted=1
    )
    before = await state_of(backend.store)
    assert await backend.store.ingest(TENANT, first) == IngestCounts(stale=100)
    assert await state_of(backend.store) == before
    if backend.scratch is not None:
        seen_key = f"{backend.scratch.prefix}:{{{TENANT}:acct1}}:seen"
        kept = await backend.scratch.client.zrange(seen_key, 0, -1)
        assert kept == [b"later"]  # pruned as the head moved


# -- concurrency ------------------------------------------------------------------------------


async def test_concurrent_writers_of_one_account_lose_no_event(backend: Backend) -> None:
    shared = [tx(f"shared{i}", T0 + i * 7.0, amount=3.0) for i in range(5)]
    own = {
        task: [
            tx(f"t{task}-{i}", T0 + task * 600 + i * 13.0, amount=1.0 + task, merchant=f"m{task}")
            for i in range(10)
        ]
        for task in range(20)
    }

    async def writer(task: int) -> IngestCounts:
        store = backend.store if task % 2 else backend.other  # two clients for Redis
        counts = IngestCounts()
        for event in [*own[task][:5], *shared, *own[task][5:]]:
            counts += await store.ingest(TENANT, [event])
        return counts

    results = await asyncio.gather(*(writer(task) for task in range(20)))
    total = sum(results, IngestCounts())
    assert total == IngestCounts(accepted=200 + 5, duplicates=20 * 5 - 5)

    every = [e for events in own.values() for e in events] + shared
    expected = replayed(sorted(every, key=lambda e: e.timestamp))["acct1"]
    stored = await state_of(backend.store)
    assert stored is not None
    end = max(e.timestamp for e in every)
    assert stored.features(end) == expected.features(end)
    assert stored.last_timestamp == expected.last_timestamp
    if backend.name != "memory":
        # 20 writers on one account, each read racing the others' writes.
        assert backend.conflicts.count > 0


async def test_concurrent_batches_over_many_accounts(backend: Backend) -> None:
    events = [e.transaction for e in simulate(seed=11, accounts=8, days=2)]
    batches = [events[i::6] for i in range(6)]
    # Every batch twice, at once, through both connections.
    results = await asyncio.gather(
        *(
            store.ingest(TENANT, batch)
            for batch in batches
            for store in (backend.store, backend.other)
        )
    )
    total = sum(results, IngestCounts())
    assert total.accepted + total.stale == len(events)
    assert total.duplicates == len(events)

    expected = replayed(sorted(events, key=lambda e: e.timestamp))
    end = events[-1].timestamp
    accounts = sorted(expected)
    for account, state in zip(accounts, await backend.store.states(mine(*accounts)), strict=True):
        assert state is not None
        assert state.features(end) == expected[account].features(end)


# -- expiry -----------------------------------------------------------------------------------


async def test_redis_keys_carry_the_ttl_and_live_under_the_prefix() -> None:
    async with redis_scratch() as scratch:
        store = RedisFeatureStore(scratch.client, prefix=scratch.prefix, ttl_seconds=TTL)
        await store.ingest(TENANT, [tx("e1", T0), tx("e2", T0 + 1, account="acct2")])
        keys = sorted([k async for k in scratch.client.scan_iter(match=f"{scratch.prefix}:*")])
        assert keys == [
            f"{scratch.prefix}:{{{TENANT}:{account}}}:{kind}".encode()
            for account in ("acct1", "acct2")
            for kind in ("seen", "state")
        ]
        for key in keys:
            assert TTL - 5 < await scratch.client.ttl(key) <= TTL

        # A write renews it; an event that changes nothing does not write.
        await scratch.client.expire(store.state_key(TENANT, "acct1"), 100)
        await scratch.client.expire(store.seen_key(TENANT, "acct1"), 100)
        await store.ingest(TENANT, [tx("e1", T0)])
        assert await scratch.client.ttl(store.state_key(TENANT, "acct1")) <= 100
        await store.ingest(TENANT, [tx("e3", T0 + 2)])
        assert await scratch.client.ttl(store.state_key(TENANT, "acct1")) > TTL - 5
        assert await scratch.client.ttl(store.seen_key(TENANT, "acct1")) > TTL - 5


async def test_memory_state_expires_after_its_ttl_unless_written() -> None:
    clock = ManualClock(T0)
    store = MemoryFeatureStore(ttl_seconds=1000, clock=clock)
    await store.ingest(TENANT, [tx("e1", T0), tx("e2", T0, account="idle")])
    clock.now += 900
    await store.ingest(TENANT, [tx("e3", T0 + 900)])  # renews acct1 only
    clock.now += 200
    assert await state_of(store) is not None
    assert await state_of(store, "idle") is None
    # And an expired account is gone, ids included: a replay counts again.
    clock.now += 1000
    assert await store.ingest(TENANT, [tx("e1", T0)]) == IngestCounts(accepted=1)


async def test_memory_sweeps_idle_accounts_it_is_never_asked_about() -> None:
    clock = ManualClock(T0)
    store = MemoryFeatureStore(ttl_seconds=100, clock=clock)
    await store.ingest(TENANT, [tx(f"e{i}", T0, account=f"a{i}") for i in range(50)])
    assert len(store) == 50
    clock.now += 120
    await store.ingest(TENANT, [tx("x", T0 + 120, account="fresh")])
    assert len(store) == 1


async def test_memory_keeps_ids_bounded_for_a_busy_account() -> None:
    store = MemoryFeatureStore(ttl_seconds=TTL)
    for day in range(30):
        await store.ingest(TENANT, [tx(f"d{day}-{i}", T0 + day * DAY + i * 60) for i in range(100)])
    (entry,) = store._entities.values()
    # 7 days of ids, give or take a doubling, not 30.
    assert len(entry.seen) <= 2 * 8 * 100


# -- Redis failures ---------------------------------------------------------------------------


async def test_an_unreachable_redis_is_a_store_error() -> None:
    async with redis_client("redis://127.0.0.1:1/0", max_connections=2, wait_seconds=0.5) as dead:
        store = RedisFeatureStore(dead, prefix="narthex-test:dead", ttl_seconds=TTL)
        with pytest.raises(FeatureStoreError):
            await store.ingest(TENANT, [tx("e1", T0)])
        with pytest.raises(FeatureStoreError):
            await store.states(mine("acct1"))
        with pytest.raises(FeatureStoreError):
            await store.ping()


async def test_a_malformed_state_is_a_store_error_not_a_reset() -> None:
    async with redis_scratch() as scratch:
        store = RedisFeatureStore(scratch.client, prefix=scratch.prefix, ttl_seconds=TTL)
        await scratch.client.set(
            store.state_key(TENANT, "acct1"), orjson.dumps({"rev": 1, "state": {}})
        )
        with pytest.raises(FeatureStoreError, match="malformed"):
            await store.states(mine("acct1"))
        with pytest.raises(FeatureStoreError, match="malformed"):
            await store.ingest(TENANT, [tx("e1", T0)])
        assert await scratch.client.get(store.state_key(TENANT, "acct1")) == b'{"rev":1,"state":{}}'
