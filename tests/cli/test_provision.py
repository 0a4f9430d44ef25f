"""`python -m narthex.cli.provision` as the compose stack runs it: a real process on a real
SQLite auth database, in prod (placeholders refused, no dev key generation in auth)."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from narthex.auth.records import KeyRecord
from narthex.cli.admin import DEMO_TENANT, INFERENCE_IDENTITY, Target, auth_settings, open_service
from narthex.common.apikeys import parse_api_key
from tests.support.databases import sqlite_url

pytestmark = pytest.mark.slow  # each run is a process loading the auth service's stack


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    # Only what the container is given: the caller's NARTHEX_* settings must not leak in.
    base = {k: v for k, v in os.environ.items() if not k.startswith("NARTHEX_")}
    return base | {
        "NARTHEX_AUTH_ENV": "prod",
        "NARTHEX_AUTH_KEY_PEPPER": "a-real-pepper-for-this-test-only",
        "NARTHEX_AUTH_DATABASE_URL": sqlite_url(tmp_path, "auth.db"),
        "NARTHEX_AUTH_SIGNING_KEYS_DIR": str(tmp_path / "keys"),
    }


def provision(env: dict[str, str], out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "narthex.cli.provision", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


async def live_keys(env: dict[str, str], tenant_name: str) -> list[KeyRecord]:
    settings = auth_settings(
        Target(database_url=env["NARTHEX_AUTH_DATABASE_URL"]),
        env="prod",
        key_pepper=env["NARTHEX_AUTH_KEY_PEPPER"],
        signing_keys_dir=Path(env["NARTHEX_AUTH_SIGNING_KEYS_DIR"]),
    )
    async with open_service(settings) as service:
        tenant = await service.store.get_tenant_by_name(tenant_name)
        assert tenant is not None
        return [k for k in await service.list_keys(tenant.id) if k.revoked_at is None]


def test_first_run_makes_the_identities_keys_and_signing_key(
    env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "provision"
    result = provision(env, out)
    assert result.returncode == 0, result.stderr
    assert "operator key (shown once, keep it): nx_live_" in result.stdout
    assert (tmp_path / "keys" / "current.pem").is_file()
    for name, tenant in (("demo.key", DEMO_TENANT), ("inference.key", INFERENCE_IDENTITY)):
        path = out / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
        key = parse_api_key(path.read_text().strip())
        assert key is not None
        assert key.env == "live"
        # The key in the file is the tenant's one live key, not printed anywhere.
        (record,) = asyncio.run(live_keys(env, tenant))
        assert record.id == key.key_id
        assert str(key) not in result.stdout


def test_a_second_run_changes_nothing(env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "provision"
    assert provision(env, out).returncode == 0
    before = {p.name: p.read_text() for p in out.iterdir()}
    again = provision(env, out)
    assert again.returncode == 0, again.stderr
    assert "already done" in again.stdout
    assert "operator key" not in again.stdout
    assert {p.name: p.read_text() for p in out.iterdir()} == before
    (record,) = asyncio.run(live_keys(env, DEMO_TENANT))
    assert before["demo.key"].strip().split("_")[2] == record.id


def test_without_its_key_files_it_makes_fresh_keys_and_retires_the_old(
    env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "provision"
    assert provision(env, out).returncode == 0
    old = (out / "inference.key").read_text()
    (out / "inference.key").unlink()
    again = provision(env, out)
    assert again.returncode == 0, again.stderr
    assert "bootstrapped earlier" in again.stdout  # the operator is made once only
    new = (out / "inference.key").read_text()
    assert new != old
    (record,) = asyncio.run(live_keys(env, INFERENCE_IDENTITY))
    assert new.split("_")[2] == record.id


def test_a_refused_setting_is_one_line_and_writes_nothing(
    env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "provision"
    result = provision(env | {"NARTHEX_AUTH_KEY_PEPPER": "change-me"}, out)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "NARTHEX_AUTH_KEY_PEPPER" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
