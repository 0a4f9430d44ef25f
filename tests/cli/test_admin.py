"""Admin commands end to end on a real SQLite auth database in a tmp state directory."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from narthex.auth.records import AuditRecord
from narthex.auth.store import AuthStore
from narthex.cli.admin import Provisioned, Target, auth_settings, open_service, provision
from narthex.cli.main import app
from narthex.cli.paths import auth_database_url
from narthex.cli.stack import REDIS_USERS, plan_ports, service_env
from narthex.common.apikeys import ApiKey, parse_api_key

KEY = re.compile(r"nx_[a-z]+_[a-z0-9]{16}_[A-Za-z0-9]{40}")


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The developer's own NARTHEX_* settings must not leak into what is under test, and a
    # command without --state-dir must not write into the checkout's .state.
    for name in list(os.environ):
        if name.startswith("NARTHEX_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


class CliRunnerCall:
    """`narthex ...` in process, on one state directory."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.runner = CliRunner()

    def __call__(self, *args: str, ok: bool = True) -> Result:
        result = self.runner.invoke(app, [*args, "--state-dir", str(self.state)])
        out = Result(result.exit_code, result.stdout, result.stderr)
        # Nothing escapes as a traceback: failures are one plain line and exit code 1.
        assert result.exception is None or isinstance(result.exception, SystemExit), result
        if ok:
            assert out.code == 0, out
        else:
            assert out.code == 1, out
            assert out.stdout == "", out
            assert out.stderr.startswith("narthex: "), out
            assert out.stderr.count("\n") == 1, out
        return out


@pytest.fixture
def narthex(state: Path) -> CliRunnerCall:
    return CliRunnerCall(state)


def only_key(output: str) -> ApiKey:
    found = KEY.findall(output)
    assert len(found) == 1, output
    key = parse_api_key(found[0])
    assert key is not None
    # On the last line, alone: `| tail -1` captures it.
    assert output.strip().splitlines()[-1] == str(key)
    return key


def rows(output: str) -> dict[str, list[str]]:
    """A table's rows by their first cell (its columns are separated by two spaces)."""
    lines = output.strip().splitlines()
    return {line.split()[0]: re.split(r"\s{2,}", line.strip()) for line in lines[1:]}


def test_bootstrap_prints_a_key_once_then_refuses(narthex: CliRunnerCall) -> None:
    first = narthex("admin", "bootstrap")
    key = only_key(first.stdout)
    assert "shown ONCE" in first.stdout
    assert "cannot be shown again" in first.stdout
    assert "role admin, plan enterprise" in first.stdout

    second = narthex("admin", "bootstrap", "--name", "other", ok=False)
    assert "already bootstrapped" in second.stderr
    tenants = rows(narthex("tenants", "list").stdout)
    assert [row[1:4] for row in tenants.values()] == [["operator", "enterprise", "admin"]]
    keys = narthex("keys", "list", "--tenant", "operator").stdout
    assert key.prefix in keys
    assert key.secret not in keys


def test_tenants_create_and_list(narthex: CliRunnerCall) -> None:
    acme = narthex("tenants", "create", "acme").stdout.strip()
    ops = narthex("tenants", "create", "ops", "--plan", "enterprise", "--admin").stdout.strip()
    assert re.fullmatch(r"t_[a-z0-9]{16}", acme)
    assert re.fullmatch(r"t_[a-z0-9]{16}", ops)

    listed = narthex("tenants", "list").stdout
    assert listed.splitlines()[0].split() == ["ID", "NAME", "PLAN", "ROLES", "CREATED"]
    table = rows(listed)
    assert table[acme][1:4] == ["acme", "standard", "tenant"]
    assert table[ops][1:4] == ["ops", "enterprise", "admin"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", table[acme][4])

    assert "already exists" in narthex("tenants", "create", "acme", ok=False).stderr
    unknown = narthex("tenants", "create", "x", "--plan", "gold", ok=False).stderr
    assert "no plan named 'gold'" in unknown
    assert "standard" in unknown
    assert set(rows(narthex("tenants", "list").stdout)) == {acme, ops}


def test_keys_create_and_list_never_show_a_secret(narthex: CliRunnerCall) -> None:
    tenant = narthex("tenants", "create", "acme").stdout.strip()
    default = only_key(narthex("keys", "create", "--tenant", "acme").stdout)
    created = narthex(
        "keys", "create", "--tenant", tenant, "--name", "ci", "--expires-in-days", "7"
    )
    ci = only_key(created.stdout)
    assert "shown ONCE" in created.stdout
    assert "expires 20" in created.stdout

    for by in ("acme", tenant):
        listed = narthex("keys", "list", "--tenant", by).stdout
        assert listed.splitlines()[0].split()[:3] == ["KEY", "NAME", "CREATED"]
        table = rows(listed)
        assert set(table) == {default.prefix, ci.prefix}
        assert table[default.prefix][1] == "default"
        assert table[default.prefix][3:] == ["never", "never", "active"]
        assert table[ci.prefix][1] == "ci"
        assert table[ci.prefix][3].startswith("20")
        for key in (default, ci):
            assert key.secret not in listed
            assert str(key) not in listed

    assert "no tenant" in narthex("keys", "list", "--tenant", "nobody", ok=False).stderr
    assert "no tenant" in narthex("keys", "create", "--tenant", "nobody", ok=False).stderr


def test_keys_revoke_and_rotate(narthex: CliRunnerCall) -> None:
    narthex("tenants", "create", "acme")
    doomed = only_key(narthex("keys", "create", "--tenant", "acme", "--name", "doomed").stdout)
    rolling = only_key(narthex("keys", "create", "--tenant", "acme", "--name", "rolling").stdout)

    revoked = narthex("keys", "revoke", doomed.key_id).stdout
    assert f"revoked key {doomed.prefix}" in revoked
    # The prefix, as `keys list` shows it, names the key as well as its id does.
    assert "already revoked" in narthex("keys", "revoke", doomed.prefix).stdout

    rotated = narthex("keys", "rotate", rolling.prefix)
    successor = only_key(rotated.stdout)
    grace = re.search(r"keeps working until (\S+ \S+)", rotated.stdout)
    assert grace is not None, rotated.stdout
    assert successor.key_id != rolling.key_id

    table = rows(narthex("keys", "list", "--tenant", "acme").stdout)
    assert table[doomed.prefix][-1] == "revoked"
    assert table[rolling.prefix][-1] == f"rotated (works until {grace.group(1)})"
    assert table[rolling.prefix][3] == grace.group(1)
    assert table[successor.prefix][1] == "rolling"
    assert table[successor.prefix][-1] == "active"

    refused = narthex("keys", "rotate", doomed.key_id, ok=False)
    assert "revoked key cannot be rotated" in refused.stderr
    assert "no key 'nope'" in narthex("keys", "revoke", "nope", ok=False).stderr
    assert "no key 'nope'" in narthex("keys", "rotate", "nope", ok=False).stderr


async def audit_log(state: Path) -> list[AuditRecord]:
    async with await AuthStore.open(auth_database_url(state)) as store:
        return await store.list_audit()


def test_every_change_is_audited_as_the_cli(narthex: CliRunnerCall) -> None:
    narthex("tenants", "create", "acme")
    key = only_key(narthex("keys", "create", "--tenant", "acme").stdout)
    narthex("keys", "rotate", key.key_id)
    narthex("keys", "revoke", key.key_id)
    audit = asyncio.run(audit_log(narthex.state))
    assert {(entry.action, entry.actor) for entry in audit} == {
        ("tenant.create", "cli"),
        ("key.create", "cli"),
        ("key.rotate", "cli"),
        ("key.revoke", "cli"),
    }


def test_database_url_overrides_the_environment(tmp_path: Path) -> None:
    runner = CliRunner()
    url = f"sqlite+aiosqlite:///{tmp_path / 'elsewhere.db'}"
    env = {"NARTHEX_AUTH_SIGNING_KEYS_DIR": str(tmp_path / "keys"), "NARTHEX_AUTH_ENV": "dev"}
    created = runner.invoke(app, ["tenants", "create", "acme", "--database-url", url], env=env)
    assert created.exit_code == 0, created.output
    assert (tmp_path / "elsewhere.db").exists()
    listed = runner.invoke(app, ["tenants", "list", "--database-url", url], env=env)
    assert "acme" in listed.stdout
    # Without the option the service's default database (here: a fresh one) is used.
    default = runner.invoke(app, ["tenants", "list"], env=env)
    assert "no tenants yet" in default.stdout
    assert (tmp_path / ".state" / "auth.db").exists()


def test_a_database_that_cannot_be_opened_is_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    url = "postgresql+asyncpg://narthex:hunter2secret@127.0.0.1:1/auth"
    result = runner.invoke(
        app, ["tenants", "list", "--database-url", url], env={"NARTHEX_AUTH_ENV": "dev"}
    )
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "cannot use the auth database postgresql+asyncpg://narthex:***@" in result.stderr
    assert "hunter2secret" not in result.output


@pytest.mark.slow
def test_bad_settings_exit_with_one_line_naming_the_setting(tmp_path: Path) -> None:
    # A real process: the exit code and stderr are what an operator sees, nothing else.
    env = {k: v for k, v in os.environ.items() if not k.startswith("NARTHEX_")}
    env["NARTHEX_AUTH_ENV"] = "prod"  # with the shipped placeholder pepper
    result = subprocess.run(
        [sys.executable, "-m", "narthex.cli.main", "tenants", "list", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert "NARTHEX_AUTH_KEY_PEPPER" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "auth.db").exists()  # refused before touching anything


# -- what `narthex up` sets up ---------------------------------------------------------------


def test_up_gives_the_auth_service_the_state_directory(tmp_path: Path) -> None:
    relative = Path("state")  # cwd is tmp_path (see clean_env)
    env = service_env("auth", "127.0.0.1", plan_ports(18000), relative)
    assert env["NARTHEX_AUTH_DATABASE_URL"] == f"sqlite+aiosqlite:///{tmp_path}/state/auth.db"
    assert env["NARTHEX_AUTH_SIGNING_KEYS_DIR"] == str(tmp_path / "state" / "keys")
    others = service_env("features", "127.0.0.1", plan_ports(18000), relative)
    assert not any(name.startswith("NARTHEX_AUTH_") for name in others)


async def test_provision_bootstraps_once_and_replaces_the_demo_and_inference_keys(
    state: Path,
) -> None:
    settings = auth_settings(Target(state_dir=state), env="dev")
    async with open_service(settings) as service:
        first = await provision(service)
        second = await provision(service)
        keys = {k.id: k for k in await service.list_keys(first.demo.id)}
        tenants = await service.store.list_tenants()
        inference = next(t for t in tenants if t.name == "service-inference")
        inference_keys = {k.id: k for k in await service.list_keys(inference.id)}

    assert first.operator_key is not None
    assert second.operator_key is None  # shown once, on the first run only
    assert first.operator == second.operator == "operator"
    assert first.demo == second.demo
    assert (first.demo.name, first.demo.plan_name) == ("demo", "standard")
    assert (first.revoked, second.revoked) == (0, 1)
    assert keys[first.demo_key.key_id].revoked_at is not None
    assert keys[second.demo_key.key_id].revoked_at is None
    assert {k.name for k in keys.values()} == {"narthex-up"}
    assert sorted(t.name for t in tenants) == ["demo", "operator", "service-inference"]
    # Inference's own identity: the service role alone, a new key each run.
    assert list(inference.roles) == ["service"]
    assert inference_keys[first.inference_key.key_id].revoked_at is not None
    assert inference_keys[second.inference_key.key_id].revoked_at is None


def test_up_gives_inference_and_only_inference_its_service_key() -> None:
    ports = plan_ports(18000)
    env = service_env("inference", "127.0.0.1", ports, Path("state"), "nx_dev_k_secret")
    assert env["NARTHEX_INFERENCE_SERVICE_KEY"] == "nx_dev_k_secret"
    for other in ("gateway", "auth", "features", "analytics"):
        with_key = service_env(other, "127.0.0.1", ports, Path("state"), "nx_dev_k_secret")
        assert "nx_dev_k_secret" not in with_key.values()


async def provision_once(state: Path) -> Provisioned:
    async with open_service(auth_settings(Target(state_dir=state), env="dev")) as service:
        return await provision(service)


def test_provision_keeps_an_operator_bootstrapped_by_hand(narthex: CliRunnerCall) -> None:
    # Sync: the command line runs its own event loop.
    narthex("admin", "bootstrap", "--name", "ops")
    provisioned = asyncio.run(provision_once(narthex.state))
    assert provisioned.operator_key is None
    assert provisioned.operator == "ops"


def test_up_gives_the_gateway_redis_only_when_the_operator_names_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("NARTHEX_GATEWAY_REDIS_URL", raising=False)
    without = service_env("gateway", "127.0.0.1", plan_ports(18000), Path("state"))
    assert "NARTHEX_GATEWAY_REDIS_URL" not in without  # in-process limits
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/3")
    shared = service_env("gateway", "127.0.0.1", plan_ports(18000), Path("state"))
    assert shared["NARTHEX_GATEWAY_REDIS_URL"] == "redis://127.0.0.1:6379/3"
    monkeypatch.setenv("NARTHEX_GATEWAY_REDIS_URL", "redis://127.0.0.1:6379/5")
    explicit = service_env("gateway", "127.0.0.1", plan_ports(18000), Path("state"))
    assert explicit["NARTHEX_GATEWAY_REDIS_URL"] == "redis://127.0.0.1:6379/5"


def test_up_points_every_redis_user_at_the_stacks_redis_and_analytics_at_its_state_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("REDIS_URL", *(f"NARTHEX_{s.upper()}_REDIS_URL" for s in REDIS_USERS)):
        monkeypatch.delenv(name, raising=False)
    url = "redis://127.0.0.1:18005/0"
    envs = {
        s: service_env(s, "127.0.0.1", plan_ports(18000), tmp_path, redis_url=url)
        for s in ("gateway", "auth", "features", "inference", "analytics")
    }

    for service in REDIS_USERS:
        assert envs[service][f"NARTHEX_{service.upper()}_REDIS_URL"] == url
    assert "NARTHEX_AUTH_REDIS_URL" not in envs["auth"]
    analytics = envs["analytics"]
    assert analytics["NARTHEX_ANALYTICS_DATABASE_URL"].endswith(
        str(tmp_path.resolve() / "analytics.db")
    )
    assert analytics["NARTHEX_ANALYTICS_AUTH_URL"] == "http://127.0.0.1:18001"
