"""AuthStore and its migrations, the same suite on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, insert, inspect, select, text
from sqlalchemy.exc import IntegrityError, StatementError

from narthex.auth.database import migrate
from narthex.auth.errors import Conflict, UnknownKey, UnknownPlan, UnknownTenant
from narthex.auth.models import ApiKey, Base
from narthex.auth.records import AuditEntry, KeyRecord, TenantRecord
from narthex.auth.store import AuthStore
from tests.support.databases import postgres_database, sqlite_url

HASH = "ab" * 32
# Microseconds and a non-UTC offset on purpose: they must survive the round trip as UTC.
T0 = datetime(2031, 5, 17, 12, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2)))


def assert_utc(value: datetime | None) -> None:
    assert value is not None
    assert value.tzinfo is UTC, value


async def make_tenant(store: AuthStore, name: str = "acme", plan: str = "free") -> TenantRecord:
    return await store.create_tenant(name, plan, ["tenant"])


async def make_key(
    store: AuthStore, tenant_id: str, key_id: str, expires_at: datetime | None = None
) -> KeyRecord:
    return await store.add_key(tenant_id, key_id, "live", f"key {key_id}", HASH, expires_at)


# -- migrations ----------------------------------------------------------------------------


async def test_migration_creates_the_tables_and_seeds_exactly_the_builtin_plans(
    store: AuthStore,
) -> None:
    async with store.engine.connect() as connection:
        tables = await connection.run_sync(lambda sync: set(inspect(sync).get_table_names()))
    assert {"plans", "tenants", "api_keys", "audit_log", "alembic_version"} <= tables

    plans = {plan.name: plan for plan in await store.list_plans()}
    numbers = {
        name: (p.rate_per_second, p.burst, p.daily_quota, p.max_items_per_request)
        for name, p in plans.items()
    }
    assert numbers == {
        "free": (1.0, 5, 1_000, 10),
        "standard": (20.0, 50, 100_000, 100),
        "enterprise": (200.0, 500, 10_000_000, 100),
    }
    for plan in plans.values():
        assert plan.builtin
        assert plan.allowed_models == ()
        assert plan.allows_model("anything")
        assert_utc(plan.created_at)


async def test_models_and_migrations_describe_the_same_schema(store: AuthStore) -> None:
    def differences(connection: Connection) -> list[object]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))

    async with store.engine.connect() as connection:
        assert await connection.run_sync(differences) == []


async def test_migrating_twice_is_harmless(database_url: str) -> None:
    async with await AuthStore.open(database_url) as store:
        tenant = await make_tenant(store)
    await migrate(database_url)
    async with await AuthStore.open(database_url) as store:
        assert len(await store.list_plans()) == 3
        assert await store.get_tenant(tenant.id) == tenant
        async with store.engine.connect() as connection:
            version = await connection.scalar(text("SELECT version_num FROM alembic_version"))
    assert version == "0001_initial"


@pytest.mark.timeout(30)  # without the advisory lock the migrations wait on each other
async def test_replicas_starting_together_migrate_once_on_postgres() -> None:
    async with postgres_database() as url:
        await asyncio.gather(*(migrate(url) for _ in range(3)))
        async with await AuthStore.open(url) as store:
            assert len(await store.list_plans()) == 3


async def test_migrate_creates_the_sqlite_directory(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "not" / "yet")
    await migrate(url)
    async with await AuthStore.open(url) as store:
        assert len(await store.list_plans()) == 3
        async with store.engine.connect() as connection:
            # WAL: the token exchange keeps reading while an admin write commits.
            assert await connection.scalar(text("PRAGMA journal_mode")) == "wal"
            assert await connection.scalar(text("PRAGMA foreign_keys")) == 1


# -- plans ---------------------------------------------------------------------------------


async def test_custom_plan_create_duplicate_and_update(store: AuthStore) -> None:
    plan = await store.create_plan(
        "research",
        rate_per_second=5.5,
        burst=11,
        daily_quota=5_000,
        max_items_per_request=20,
        allowed_models=["fraud"],
    )
    assert not plan.builtin
    assert plan.allows_model("fraud")
    assert not plan.allows_model("minilm")
    assert await store.get_plan("research") == plan

    with pytest.raises(Conflict):
        await store.create_plan(
            "research", rate_per_second=1, burst=1, daily_quota=1, max_items_per_request=1
        )
    with pytest.raises(Conflict):
        await store.create_plan(
            "free", rate_per_second=1, burst=1, daily_quota=1, max_items_per_request=1
        )

    updated = await store.update_plan("research", burst=30, allowed_models=[])
    assert (updated.burst, updated.allowed_models, updated.daily_quota) == (30, (), 5_000)
    assert await store.get_plan("research") == updated
    assert await store.get_plan("nope") is None
    with pytest.raises(UnknownPlan):
        await store.update_plan("nope", burst=1)
    not_a_setting: dict[str, Any] = {"builtin": True}
    with pytest.raises(TypeError, match="builtin"):
        await store.update_plan("research", **not_a_setting)


# -- tenants -------------------------------------------------------------------------------


async def test_tenants_create_get_list_and_set_plan(store: AuthStore) -> None:
    acme = await store.create_tenant("acme", "free", ["tenant"])
    ops = await store.create_tenant("ops", "enterprise", ["admin"])
    assert re.fullmatch(r"t_[a-z0-9]{16}", acme.id)
    assert acme.id != ops.id
    assert (acme.name, acme.plan_name, acme.roles, acme.disabled_at) == (
        "acme",
        "free",
        ("tenant",),
        None,
    )
    assert_utc(acme.created_at)
    assert await store.get_tenant(acme.id) == acme
    assert await store.get_tenant_by_name("ops") == ops
    assert await store.get_tenant("t_missing") is None
    assert await store.get_tenant_by_name("missing") is None
    assert await store.list_tenants() == [acme, ops]

    moved = await store.set_tenant_plan(acme.id, "standard")
    assert moved.plan_name == "standard"
    assert await store.get_tenant(acme.id) == moved

    disabled = await store.set_tenant_disabled(acme.id, T0)
    assert disabled.disabled_at == T0
    assert_utc(disabled.disabled_at)
    assert await store.get_tenant(acme.id) == disabled
    assert (await store.set_tenant_disabled(acme.id, None)).disabled_at is None


async def test_tenant_errors(store: AuthStore) -> None:
    acme = await make_tenant(store)
    with pytest.raises(Conflict):
        await store.create_tenant("acme", "standard", ["tenant"])
    with pytest.raises(UnknownPlan):
        await store.create_tenant("globex", "platinum", ["tenant"])
    with pytest.raises(UnknownPlan):
        await store.set_tenant_plan(acme.id, "platinum")
    with pytest.raises(UnknownTenant):
        await store.set_tenant_plan("t_missing", "free")
    with pytest.raises(UnknownTenant):
        await store.set_tenant_disabled("t_missing", T0)
    assert await store.list_tenants() == [acme]


# -- keys ----------------------------------------------------------------------------------


async def test_add_and_get_key_with_its_tenant_and_plan(store: AuthStore) -> None:
    tenant = await make_tenant(store, plan="standard")
    key = await make_key(store, tenant.id, "k" * 16, expires_at=T0)
    assert (key.tenant_id, key.env, key.name, key.secret_hash) == (
        tenant.id,
        "live",
        "key " + "k" * 16,
        HASH,
    )
    assert key.expires_at == T0
    assert (key.last_used_at, key.revoked_at, key.replaced_by) == (None, None, None)
    assert_utc(key.created_at)
    assert_utc(key.expires_at)
    assert HASH not in repr(key)

    resolved = await store.get_key(key.id)
    assert resolved is not None
    assert resolved.key == key
    assert resolved.tenant == tenant
    assert resolved.plan == await store.get_plan("standard")
    assert await store.get_key("missing") is None
    with pytest.raises(Conflict):
        await make_key(store, tenant.id, key.id)


async def test_list_keys_is_per_tenant(store: AuthStore) -> None:
    acme = await make_tenant(store, "acme")
    globex = await make_tenant(store, "globex")
    first = await make_key(store, acme.id, "a1")
    second = await make_key(store, acme.id, "a2")
    other = await make_key(store, globex.id, "g1")
    assert await store.list_keys(acme.id) == [first, second]
    assert await store.list_keys(globex.id) == [other]
    assert await store.list_keys("t_missing") == []


async def test_revoke_key_keeps_the_first_revocation(store: AuthStore) -> None:
    tenant = await make_tenant(store)
    key = await make_key(store, tenant.id, "k1")
    now = datetime.now(UTC)
    assert key.is_active(now)

    revoked = await store.revoke_key(key.id, T0)
    assert revoked.revoked_at == T0
    assert_utc(revoked.revoked_at)
    assert not revoked.is_active(now)
    again = await store.revoke_key(key.id, T0 + timedelta(days=1))
    assert again.revoked_at == T0
    resolved = await store.get_key(key.id)
    assert resolved is not None
    assert resolved.key == again
    with pytest.raises(UnknownKey):
        await store.revoke_key("missing", T0)


async def test_rotate_key(store: AuthStore) -> None:
    tenant = await make_tenant(store)
    old = await make_key(store, tenant.id, "old")
    grace = T0 + timedelta(hours=1)

    rotation = await store.rotate_key("old", "new", "test", "rotated", "cd" * 32, grace)
    assert rotation.old.expires_at == grace
    assert rotation.old.replaced_by == "new"
    assert rotation.old.secret_hash == old.secret_hash
    assert rotation.new.tenant_id == tenant.id
    assert (rotation.new.env, rotation.new.name, rotation.new.secret_hash) == (
        "test",
        "rotated",
        "cd" * 32,
    )
    assert rotation.new.is_active(datetime.now(UTC))
    assert (rotation.new.expires_at, rotation.new.revoked_at) == (None, None)
    assert await store.list_keys(tenant.id) == [rotation.old, rotation.new]

    # A rotated key is not rotated again: that would fork the chain.
    with pytest.raises(Conflict):
        await store.rotate_key("old", "newer", "test", "x", HASH, grace)
    with pytest.raises(UnknownKey):
        await store.rotate_key("missing", "newer", "test", "x", HASH, grace)
    await store.revoke_key("new", T0)
    with pytest.raises(Conflict):
        await store.rotate_key("new", "newer", "test", "x", HASH, grace)


async def test_rotation_never_extends_an_earlier_expiry(store: AuthStore) -> None:
    tenant = await make_tenant(store)
    await make_key(store, tenant.id, "soon", expires_at=T0)
    rotation = await store.rotate_key("soon", "next", "live", "n", HASH, T0 + timedelta(days=7))
    assert rotation.old.expires_at == T0


async def test_failed_rotation_changes_nothing(store: AuthStore) -> None:
    tenant = await make_tenant(store)
    old = await make_key(store, tenant.id, "old")
    taken = await make_key(store, tenant.id, "taken")
    audit = AuditEntry("cli", "key.rotate")
    with pytest.raises(Conflict):
        await store.rotate_key("old", "taken", "live", "n", HASH, T0, audit=audit)
    assert await store.list_keys(tenant.id) == [old, taken]
    assert await store.list_audit() == []


async def test_touch_keys_only_moves_last_used_forward(store: AuthStore) -> None:
    tenant = await make_tenant(store)
    for key_id in ("k1", "k2", "k3"):
        await make_key(store, tenant.id, key_id)

    async def last_used() -> dict[str, datetime | None]:
        return {key.id: key.last_used_at for key in await store.list_keys(tenant.id)}

    await store.touch_keys({})
    await store.touch_keys({"k1": T0, "k2": T0, "missing": T0})
    assert await last_used() == {"k1": T0, "k2": T0, "k3": None}

    later = T0 + timedelta(microseconds=1)
    await store.touch_keys({"k1": T0 - timedelta(seconds=1), "k2": later, "k3": T0})
    assert await last_used() == {"k1": T0, "k2": later, "k3": T0}
    for value in (await last_used()).values():
        assert_utc(value)


# -- time and integrity --------------------------------------------------------------------


async def test_datetimes_come_back_equal_and_in_utc(store: AuthStore) -> None:
    tenant = await make_tenant(store)
    await make_key(store, tenant.id, "k1", expires_at=T0)
    resolved = await store.get_key("k1")
    assert resolved is not None
    assert resolved.key.expires_at == T0
    assert resolved.key.expires_at is not None
    assert resolved.key.expires_at.utcoffset() == timedelta(0)
    assert resolved.key.expires_at.replace(tzinfo=None) == datetime(2031, 5, 17, 10, 30, 15, 123456)
    assert_utc(resolved.key.created_at)
    assert_utc(resolved.tenant.created_at)
    assert_utc(resolved.plan.created_at)

    # A naive datetime is a bug in the caller: refused, not silently taken as UTC or local.
    with pytest.raises(StatementError, match="naive datetime"):
        await make_key(store, tenant.id, "k2", expires_at=datetime(2031, 1, 1))
    assert [key.id for key in await store.list_keys(tenant.id)] == ["k1"]


async def test_foreign_keys_are_enforced_by_the_database(store: AuthStore) -> None:
    with pytest.raises(UnknownTenant):
        await make_key(store, "t_missing", "k1")
    now = datetime.now(UTC)
    row = {"id": "k2", "tenant_id": "t_missing", "env": "live", "name": "x"}
    async with store.engine.connect() as connection:
        with pytest.raises(IntegrityError):
            await connection.execute(insert(ApiKey).values(**row, secret_hash=HASH, created_at=now))
    async with store.engine.connect() as connection:
        assert await connection.scalar(select(ApiKey.id)) is None


# -- audit ---------------------------------------------------------------------------------


async def test_record_and_list_audit_newest_first(store: AuthStore) -> None:
    first = await store.record("cli", "tenant.create", "t_a", {"name": "a"})
    second = await store.record("t_admin", "key.revoke", "k1", {})
    assert (first.actor, first.action, first.target, first.detail) == (
        "cli",
        "tenant.create",
        "t_a",
        {"name": "a"},
    )
    assert_utc(first.at)
    assert second.id > first.id
    assert await store.list_audit() == [second, first]
    assert await store.list_audit(limit=1) == [second]


async def test_mutations_write_their_audit_line_in_the_same_transaction(
    store: AuthStore,
) -> None:
    admin = "t_admin0000000000"
    tenant = await store.create_tenant(
        "acme", "free", ["tenant"], audit=AuditEntry(admin, "tenant.create", detail={"x": 1})
    )
    (entry,) = await store.list_audit()
    assert (entry.actor, entry.action, entry.target, entry.detail) == (
        admin,
        "tenant.create",
        tenant.id,
        {"x": 1},
    )

    # Each of these fails after its audit line was written: the line must go with it.
    audit = AuditEntry(admin, "some.action")
    with pytest.raises(Conflict):
        await store.create_tenant("acme", "free", ["tenant"], audit=audit)
    with pytest.raises(UnknownPlan):
        await store.create_tenant("globex", "gold", ["tenant"], audit=audit)
    with pytest.raises(UnknownPlan):
        await store.set_tenant_plan(tenant.id, "gold", audit=audit)
    with pytest.raises(UnknownTenant):
        await store.add_key("t_missing", "k1", "live", "x", HASH, audit=audit)
    with pytest.raises(UnknownKey):
        await store.revoke_key("missing", T0, audit=audit)
    with pytest.raises(UnknownPlan):
        await store.update_plan("gold", burst=1, audit=audit)
    assert await store.list_audit() == [entry]

    key = await store.add_key(
        tenant.id, "k1", "live", "x", HASH, audit=AuditEntry(admin, "key.create", target="other")
    )
    await store.revoke_key(key.id, T0, audit=AuditEntry(admin, "key.revoke"))
    actions = [(e.action, e.target) for e in await store.list_audit()]
    assert actions == [("key.revoke", "k1"), ("key.create", "other"), ("tenant.create", tenant.id)]
