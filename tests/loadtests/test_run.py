"""`make loadtest`'s runner against a real `narthex up` stack: a 15-second smoke run with the
noisy neighbour passes its SLA and leaves no tenant or key enabled behind it; an impossible
SLA fails naming the breach, on a stack the runner starts for the run and stops after."""

from __future__ import annotations

import asyncio
import csv
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from narthex.auth.records import KeyRecord, TenantRecord
from narthex.cli.admin import Target, auth_settings, open_service
from narthex.loadtests.run import HERE
from narthex.loadtests.scenario import CLASS_NAMES
from narthex.loadtests.sla import load_sla
from narthex.loadtests.stack import gateway_of, local_stack
from tests.support.models import builtin_repository
from tests.support.services import free_port_base

# The stack boots in 10-100 s depending on how busy the machine is; each run is bounded.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# Five services booting at once on a busy 2-CPU machine, then Locust: generous, bounded.
READY_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 240.0
RUN_ID = re.compile(r"^run (\S+): ", re.MULTILINE)


def stack_env() -> dict[str, str]:
    # The developer's own NARTHEX_* settings must not leak into what is under test; the
    # built-in models are built once for the whole test run.
    env = {k: v for k, v in os.environ.items() if not k.startswith("NARTHEX_")}
    env["NARTHEX_INFERENCE_MODEL_REPOSITORY"] = str(builtin_repository())
    return env


@dataclass(frozen=True)
class Stack:
    state_dir: Path
    url: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state_dir = tmp_path_factory.mktemp("state")
    with local_stack(
        state_dir, free_port_base(), state_dir / "up.log", READY_TIMEOUT_S, stack_env()
    ) as url:
        yield Stack(state_dir, url)


@dataclass(frozen=True)
class Run:
    code: int
    output: str
    out: Path

    @property
    def run_id(self) -> str:
        match = RUN_ID.search(self.output)
        assert match is not None, self.output
        return match.group(1)

    def last_line(self) -> str:
        return self.output.rstrip().splitlines()[-1]


def loadtest(state_dir: Path, out: Path, *args: str, env: dict[str, str] | None = None) -> Run:
    argv = [sys.executable, "-m", "narthex.loadtests.run", "--state-dir", str(state_dir)]
    done = subprocess.run(
        [*argv, "--out", str(out), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=RUN_TIMEOUT_S,
        env=env or stack_env(),
        check=False,
    )
    return Run(done.returncode, done.stdout, out)


def run_records(state_dir: Path, run_id: str) -> tuple[list[TenantRecord], list[KeyRecord]]:
    """The tenants a run made, and their keys and the operator's key minted for it."""

    async def read() -> tuple[list[TenantRecord], list[KeyRecord]]:
        async with open_service(auth_settings(Target(state_dir=state_dir), env="dev")) as auth:
            tenants = await auth.store.list_tenants()
            made = [t for t in tenants if t.name.startswith(f"loadtest-{run_id}-")]
            keys = [k for t in tenants for k in await auth.list_keys(t.id)]
            return made, [k for k in keys if k.name == f"loadtest-{run_id}"]

    return asyncio.run(read())


def stats_rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "stats_stats.csv").open(newline="") as handle:
        return {row["Name"]: row for row in csv.DictReader(handle)}


def test_smoke_run_passes_its_sla_beside_a_noisy_neighbour(stack: Stack, tmp_path: Path) -> None:
    run = loadtest(
        stack.state_dir,
        tmp_path / "smoke",
        *("--duration", "15s", "--users", "6", "--spawn-rate", "6"),
        *("--scenario", "smoke", "--sla", "smoke"),
    )
    print(run.output)  # the numbers, for whoever runs it with -s
    assert run.code == 0, run.output
    assert run.last_line().startswith("SLA PASSED"), run.output
    assert f"testing the running stack of {stack.state_dir}: {stack.url}" in run.output

    # Every endpoint the SLA judges was exercised, and so was the neighbour's flood.
    rows = stats_rows(run.out)
    for name in load_sla(HERE / "sla" / "smoke.yaml").endpoints:
        assert int(rows[name]["Request Count"]) > 0, name
    assert int(rows["flood POST /v1/embeddings"]["Request Count"]) > 0

    # The HTML report shows each user class.
    report = (run.out / "report.html").read_text()
    for class_name in CLASS_NAMES.values():
        assert class_name in report, class_name

    # Cleaned up: every tenant the run made is disabled and its key revoked, and the
    # operator's key minted for the run is revoked too.
    tenants, keys = run_records(stack.state_dir, run.run_id)
    assert sorted(t.name.rsplit("-", 1)[-1] for t in tenants) == sorted(CLASS_NAMES)
    assert all(t.disabled_at is not None for t in tenants), tenants
    assert len(keys) == len(CLASS_NAMES) + 1
    assert all(k.revoked_at is not None for k in keys), keys


def test_an_admin_key_that_does_not_work_runs_nothing_and_gives_no_verdict(
    stack: Stack, tmp_path: Path
) -> None:
    env = {**stack_env(), "NARTHEX_LOADTEST_ADMIN_KEY": "nx_dev_0000000000000000_" + "x" * 40}
    run = loadtest(
        stack.state_dir,
        tmp_path / "refused",
        *("--duration", "10s", "--users", "6", "--scenario", "smoke", "--sla", "smoke"),
        env=env,
    )
    assert run.code == 2, run.output
    assert "no SLA verdict" in run.last_line()
    log = (run.out / "locust.log").read_text()
    assert "provisioning the run's tenants failed: POST /v1/admin/plans: 401" in log
    assert not (run.out / "stats_stats.csv").exists() or all(
        int(row["Request Count"]) == 0 for row in stats_rows(run.out).values()
    )


def test_impossible_sla_fails_naming_the_breach_on_a_stack_started_for_the_run(
    tmp_path: Path,
) -> None:
    state_dir = tmp_path / "state"
    run = loadtest(
        state_dir,
        tmp_path / "impossible",
        *("--port-base", str(free_port_base()), "--duration", "5s", "--users", "6"),
        *("--scenario", "smoke", "--sla", "impossible"),
    )
    assert run.code == 1, run.output
    assert f"no stack running for {state_dir}: starting `narthex up`" in run.output
    assert run.last_line().startswith("SLA FAILED"), run.output
    assert run.last_line().endswith("on watcher GET /v1/quota"), run.output
    breaches = [
        line.split()[3] for line in run.output.splitlines() if line.startswith("watcher GET")
    ]
    # The endpoint's row in the table, then one row per breach: p95, p99, throughput.
    assert breaches[1:] == ["p95", "p99", "throughput"], run.output
    # The stack started for the run is stopped after it.
    assert gateway_of(state_dir) is None
    tenants, keys = run_records(state_dir, run.run_id)
    assert tenants
    assert all(t.disabled_at is not None for t in tenants)
    assert all(k.revoked_at is not None for k in keys)


def test_fewer_users_than_kinds_of_user_is_refused_before_any_load(tmp_path: Path) -> None:
    run = loadtest(tmp_path / "state", tmp_path / "few", "--users", "2", "--scenario", "smoke")
    assert run.code == 2
    assert "--users 2 is fewer than the scenario's 6 kinds of user" in run.output
    assert not (tmp_path / "state" / "up.json").exists()


def test_another_gateway_without_an_admin_key_is_refused_before_any_load(
    tmp_path: Path,
) -> None:
    run = loadtest(tmp_path / "state", tmp_path / "remote", "--url", "http://127.0.0.1:9")
    assert run.code == 2
    assert "no admin key: set NARTHEX_LOADTEST_ADMIN_KEY" in run.output
    assert not (tmp_path / "remote" / "stats_stats.csv").exists()
