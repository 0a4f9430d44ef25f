"""Admin commands on the auth database, through AuthService, and what `narthex up` provisions."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from alembic.util.exc import CommandError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from narthex.auth.database import migrate
from narthex.auth.errors import AlreadyBootstrapped
from narthex.auth.records import KeyRecord, TenantRecord
from narthex.auth.service import AuthService
from narthex.auth.settings import AuthSettings
from narthex.auth.signing import KeyRingError, SigningKeyRing
from narthex.auth.store import AuthStore
from narthex.cli.paths import auth_database_url, signing_keys_dir
from narthex.common.apikeys import ApiKey
from narthex.common.errors import NotFound, Problem
from narthex.common.scopes import ADMIN, TENANT
from narthex.common.settings import SettingsError, load_settings
from narthex.common.tokens import SigningKey

ACTOR = "cli"
DEMO_TENANT = "demo"
DEMO_PLAN = "standard"
# The inference service's own identity: it reads features with it (role service).
INFERENCE_IDENTITY = "service-inference"
UP_KEY_NAME = "narthex-up"

Action = Callable[[AuthService], Awaitable[list[str]]]


class AdminError(Exception):
    """A refusal of the command line itself, printed as one line."""


@dataclass(frozen=True)
class Target:
    """Which auth database and signing keys: the auth service's env, unless overridden."""

    database_url: str | None = None
    state_dir: Path | None = None


def auth_settings(target: Target, **overrides: Any) -> AuthSettings:
    """The auth service's settings as it would read them, with the target's overrides."""
    values: dict[str, Any] = {}
    if target.database_url is None and f"{AuthSettings.model_config['env_prefix']}ENV" not in (
        os.environ
    ):
        # Without a database URL the target is the local `narthex up` stack, which runs in
        # dev (its auth hashes keys with the dev pepper). Anything else is read as the
        # service reads it: production unless the environment says otherwise.
        values["env"] = "dev"
    if target.state_dir is not None:
        values["database_url"] = auth_database_url(target.state_dir)
        values["signing_keys_dir"] = signing_keys_dir(target.state_dir)
    if target.database_url is not None:
        values["database_url"] = target.database_url
    values.update(overrides)
    return load_settings(AuthSettings, **values)


class _NoSigningKeys(SigningKeyRing):
    """Stands in where the signing keys are not on this machine: admin commands never sign."""

    def __init__(self, directory: Path) -> None:  # no super(): there is nothing to load
        self.directory = directory
        self.generate = False

    def _refuse(self) -> AdminError:
        return AdminError(f"no signing keys at {self.directory}")

    def signing_key(self) -> SigningKey:
        raise self._refuse()

    def jwks(self) -> dict[str, Any]:
        raise self._refuse()

    def rotate(self, publish_for: float) -> SigningKey:
        raise self._refuse()

    @property
    def promote_at(self) -> float | None:
        return None


def _keyring(settings: AuthSettings) -> SigningKeyRing:
    # In dev this generates the keys if missing, as the auth service does on its first start.
    try:
        return SigningKeyRing(settings.signing_keys_dir, generate=settings.env == "dev")
    except KeyRingError:
        # Outside dev the keys may live only where the service runs (a mounted secret).
        return _NoSigningKeys(settings.signing_keys_dir)


@asynccontextmanager
async def open_service(settings: AuthSettings) -> AsyncIterator[AuthService]:
    """An AuthService on the migrated database, closed afterwards."""
    await migrate(settings.database_url)
    store = await AuthStore.open(settings.database_url)
    try:
        yield AuthService(store, _keyring(settings), settings)
    finally:
        await store.close()


def _database_name(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(unparsable URL)"


def error_line(exc: BaseException, settings: AuthSettings | None = None) -> str:
    """The one line an operator sees for a failure: never a traceback, never a secret."""
    if isinstance(exc, SettingsError):
        return exc.message
    if isinstance(exc, AlreadyBootstrapped):
        return (
            "already bootstrapped: an admin tenant exists, and its key was shown when it was"
            " created; `narthex keys create --tenant <admin tenant>` makes another"
        )
    if isinstance(exc, Problem):
        return exc.detail or exc.title
    if isinstance(exc, AdminError):
        return str(exc)
    where = _database_name(settings.database_url) if settings is not None else "the database"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"cannot use the auth database {where}: {first}"


# What a command may fail with and still deserve one plain line rather than a traceback.
EXPECTED_ERRORS = (
    SettingsError,
    Problem,
    AdminError,
    SQLAlchemyError,
    CommandError,
    OSError,
    ImportError,
)


def run(
    target: Target, action: Action, out: IO[str] | None = None, err: IO[str] | None = None
) -> int:
    """Run one admin action on the target's database: 0, or 1 with one line on `err`."""
    # Looked up per call, not bound as defaults: a test runner swaps sys.stdout.
    out, err = out or sys.stdout, err or sys.stderr
    settings = None
    try:
        settings = auth_settings(target)
        lines = asyncio.run(_run(settings, action))
    except EXPECTED_ERRORS as exc:
        print(f"narthex: {error_line(exc, settings)}", file=err, flush=True)
        return 1
    for line in lines:
        print(line, file=out, flush=True)
    return 0


async def _run(settings: AuthSettings, action: Action) -> list[str]:
    async with open_service(settings) as service:
        return await action(service)


# -- formatting ------------------------------------------------------------------------------


def when(value: datetime | None, none: str = "-") -> str:
    return none if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def key_prefix(record: KeyRecord) -> str:
    return f"nx_{record.env}_{record.id}"


def key_status(record: KeyRecord, now: datetime) -> str:
    if record.revoked_at is not None:
        return "revoked"
    if record.expires_at is not None and record.expires_at <= now:
        return "expired"
    if record.replaced_by is not None:
        return f"rotated (works until {when(record.expires_at)})"
    return "active"


def shown_once(key: ApiKey, what: str) -> list[str]:
    # The key on a line of its own, last, so that `| tail -1` captures it.
    return [
        f"{what} (shown ONCE: only its hash is stored, it cannot be shown again; keep it now):",
        str(key),
    ]


def key_id_of(text: str) -> str:
    """A key id from an id or a `nx_<env>_<id>` prefix, as `keys list` shows them."""
    parts = text.strip().split("_")
    return parts[2] if len(parts) >= 3 and parts[0] == "nx" else text.strip()


# -- actions ---------------------------------------------------------------------------------


async def find_tenant(service: AuthService, id_or_name: str) -> TenantRecord:
    tenant = await service.store.get_tenant(id_or_name)
    tenant = tenant or await service.store.get_tenant_by_name(id_or_name)
    if tenant is None:
        raise NotFound(f"no tenant with id or name {id_or_name!r} (see `narthex tenants list`)")
    return tenant


async def bootstrap(service: AuthService, name: str) -> list[str]:
    tenant, key = await service.bootstrap(name)
    return [
        f"operator tenant {tenant.name!r} created: id {tenant.id}, role admin,"
        f" plan {tenant.plan_name}",
        *shown_once(key, "its admin key"),
    ]


async def create_tenant(service: AuthService, name: str, plan: str, admin: bool) -> list[str]:
    if await service.store.get_plan(plan) is None:
        plans = ", ".join(p.name for p in await service.store.list_plans())
        raise NotFound(f"no plan named {plan!r} (plans: {plans})")
    tenant = await service.create_tenant(name, plan, [ADMIN if admin else TENANT], actor=ACTOR)
    # The id alone, so that scripts can capture it.
    return [tenant.id]


async def list_tenants(service: AuthService) -> list[str]:
    rows = [
        [t.id, t.name, t.plan_name, ",".join(t.roles), when(t.created_at)]
        + (["disabled"] if t.disabled_at is not None else [])
        for t in await service.store.list_tenants()
    ]
    if not rows:
        return ["no tenants yet (`narthex admin bootstrap` creates the first)"]
    width = max(len(row) for row in rows)
    header = ["ID", "NAME", "PLAN", "ROLES", "CREATED", "STATE"][:width]
    return table(header, [row + [""] * (width - len(row)) for row in rows])


async def create_key(
    service: AuthService, tenant: str, name: str, expires_in_days: int | None
) -> list[str]:
    owner = await find_tenant(service, tenant)
    expires_at = None
    if expires_in_days is not None:
        expires_at = datetime.now(UTC) + timedelta(days=expires_in_days)
    # The operator on the database: a service identity's keys are made here, too.
    key, record = await service.create_key(
        owner.id, name, expires_at, actor=ACTOR, allow_service=True
    )
    return [
        f"key {key.prefix} {name!r} for tenant {owner.name} ({owner.id}),"
        f" expires {when(record.expires_at, 'never')}",
        *shown_once(key, "the key"),
    ]


async def list_keys(service: AuthService, tenant: str) -> list[str]:
    owner = await find_tenant(service, tenant)
    now = datetime.now(UTC)
    # Never a secret: only its hash is stored, and the hash is not shown either.
    rows = [
        [
            key_prefix(k),
            k.name,
            when(k.created_at),
            when(k.expires_at, "never"),
            when(k.last_used_at, "never"),
            key_status(k, now),
        ]
        for k in await service.list_keys(owner.id)
    ]
    if not rows:
        return [f"tenant {owner.name} ({owner.id}) has no keys"]
    return table(["KEY", "NAME", "CREATED", "EXPIRES", "LAST USED", "STATUS"], rows)


def _no_such_key(key: str) -> NotFound:
    return NotFound(f"no key {key!r} (see `narthex keys list --tenant <tenant>`)")


async def revoke_key(service: AuthService, key: str) -> list[str]:
    started = datetime.now(UTC)
    try:
        record = await service.revoke_key(key_id_of(key), actor=ACTOR)
    except NotFound:
        raise _no_such_key(key) from None
    if record.revoked_at is not None and record.revoked_at < started:
        return [f"key {key_prefix(record)} was already revoked at {when(record.revoked_at)}"]
    return [
        f"revoked key {key_prefix(record)} of tenant {record.tenant_id}; the gateway stops"
        " accepting it within NARTHEX_GATEWAY_API_KEY_REVALIDATE_SECONDS (30 s by default)"
    ]


async def rotate_key(service: AuthService, key: str) -> list[str]:
    try:
        old, new_key, _ = await service.rotate_key(key_id_of(key), actor=ACTOR, allow_service=True)
    except NotFound:
        raise _no_such_key(key) from None
    return [
        f"rotated key {key_prefix(old)}: it keeps working until {when(old.expires_at)}",
        *shown_once(new_key, f"its successor {new_key.prefix}"),
    ]


# -- what `narthex up` sets up ---------------------------------------------------------------


@dataclass(frozen=True)
class Provisioned:
    operator: str  # name of the (first) admin tenant
    operator_key: ApiKey | None  # None: bootstrapped earlier, its key was shown then
    demo: TenantRecord
    demo_key: ApiKey
    revoked: int  # earlier `narthex-up` keys of the demo tenant, revoked now
    inference_key: ApiKey  # the inference service's own, for this run (never printed)


async def provision(service: AuthService) -> Provisioned:
    """The operator tenant once, the demo tenant, the inference service's identity, and
    fresh keys for this run: the demo tenant's and inference's (earlier ones retired)."""
    operator_key: ApiKey | None = None
    # Refused once an admin tenant exists: after the first run, or an admin bootstrap.
    with contextlib.suppress(AlreadyBootstrapped):
        _, operator_key = await service.bootstrap()
    operator = next(t.name for t in await service.store.list_tenants() if ADMIN in t.roles)
    demo = await service.ensure_tenant(DEMO_TENANT, DEMO_PLAN, actor=ACTOR)
    demo_key, revoked = await service.fresh_key(demo.id, UP_KEY_NAME, actor=ACTOR)
    inference = await service.ensure_service(INFERENCE_IDENTITY, actor=ACTOR)
    inference_key, _ = await service.fresh_key(inference.id, UP_KEY_NAME, actor=ACTOR)
    return Provisioned(operator, operator_key, demo, demo_key, revoked, inference_key)


def provision_sync(state_dir: Path) -> Provisioned:
    """`provision` on the database the `up` children use (their env, dev, `state_dir`)."""
    settings = auth_settings(Target(state_dir=state_dir), env="dev")

    async def go() -> Provisioned:
        async with open_service(settings) as service:
            return await provision(service)

    try:
        return asyncio.run(go())
    except EXPECTED_ERRORS as exc:
        raise AdminError(error_line(exc, settings)) from None
