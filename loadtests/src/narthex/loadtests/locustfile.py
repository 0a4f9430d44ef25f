"""The file Locust runs (`locust -f` this path): the user classes, and the run's tenants made
when the test starts and undone when it stops, on the master (or the only process).

A worker (`--processes`, or `--worker` on other machines) makes nothing: the master sends
it the tenants' keys before the first users are spawned. The operator's admin key comes
from NARTHEX_LOADTEST_ADMIN_KEY, never from the command line (it would show in `ps`).
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import gevent
from locust import events
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment
from locust.event import EventHook
from locust.runners import MasterRunner, WorkerRunner

from narthex.loadtests.provision import (
    ADMIN_KEY_ENV,
    Provisioner,
    ProvisionError,
    TenantCredentials,
)
from narthex.loadtests.scenario import Scenario, ScenarioError, load_scenario
from narthex.loadtests.users import (
    TENANTS,
    EmbedderUser,
    FloodUser,
    FraudUser,
    OpenAIUser,
    OperatorUser,
    WatcherUser,
    configure,
)

__all__ = [
    "EmbedderUser",
    "FloodUser",
    "FraudUser",
    "OpenAIUser",
    "OperatorUser",
    "WatcherUser",
]

log = logging.getLogger("narthex.loadtests")

TENANTS_MESSAGE = "narthex-tenants"
DEFAULT_SCENARIO = Path(__file__).resolve().parents[3] / "scenarios" / "mix.yaml"
# Keys made for the run expire on their own this long after its planned end.
KEY_GRACE_S = 3600.0

_provisioner: list[Provisioner] = []


def _arguments(parser: LocustArgumentParser) -> None:
    parser.add_argument(
        "--scenario",
        default=str(DEFAULT_SCENARIO),
        help="narthex scenario file (YAML): users' weights and think times, plans, flood",
    )
    parser.add_argument(
        "--run-id",
        default="",
        help="names the run's tenants and plans (default: the UTC time and a random suffix)",
    )


def _scenario(environment: Environment) -> Scenario:
    options = environment.parsed_options
    path = Path(options.scenario if options is not None else DEFAULT_SCENARIO)
    return load_scenario(path)


def _init(environment: Environment, **_: Any) -> None:
    # gevent's loop caches "now" until it next runs, and importing this file (numpy, the
    # openai SDK) blocks it for seconds: Locust's --run-time timer, armed next, would
    # count those seconds and end the run early by as much.
    gevent.get_hub().loop.update_now()
    # One line per admin call or request would drown the log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        configure(_scenario(environment))
    except ScenarioError as exc:
        log.error("%s", exc)
        raise SystemExit(2) from None
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        runner.register_message(TENANTS_MESSAGE, _receive_tenants)


def _receive_tenants(environment: Environment, msg: Any, **_: Any) -> None:
    data = msg.data
    if data.get("error"):
        TENANTS.fail(str(data["error"]))
    else:
        tenants = [TenantCredentials.from_json(t) for t in data["tenants"]]
        TENANTS.publish(str(data["run_id"]), tenants)


def _users(environment: Environment) -> int:
    options = environment.parsed_options
    return int(getattr(options, "num_users", 0) or 1) if options is not None else 1


def _run_seconds(environment: Environment) -> float:
    options = environment.parsed_options
    return float(getattr(options, "run_time", 0) or 0) if options is not None else 0.0


def _provision(environment: Environment, run_id: str) -> list[TenantCredentials]:
    admin_key = os.environ.get(ADMIN_KEY_ENV, "")
    if not admin_key:
        raise ProvisionError(f"no admin key: set {ADMIN_KEY_ENV} (the runner mints one)")
    if not environment.host:
        raise ProvisionError("no --host: the gateway's URL")
    scenario = TENANTS.scenario
    provisioner = Provisioner(
        environment.host, admin_key, run_id, _run_seconds(environment) + KEY_GRACE_S
    )
    _provisioner.append(provisioner)
    size = scenario.plan
    rate, burst = size.numbers(_users(environment))
    plan = provisioner.plan("mix", rate, burst, size.daily_quota, size.max_items_per_request)
    tenants = [provisioner.tenant(name, plan, admin=name == "operator") for name in scenario.users]
    if scenario.flood is not None:
        big = scenario.flood.plan
        rate, burst = big.numbers(scenario.flood.users)
        flood_plan = provisioner.plan(
            "flood", rate, burst, big.daily_quota, big.max_items_per_request
        )
        tenants.append(provisioner.tenant("flood", flood_plan))
    return tenants


def _test_start(environment: Environment, **_: Any) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        return
    options = environment.parsed_options
    run_id = (options.run_id if options is not None else "") or (
        f"{datetime.now(UTC):%Y%m%d%H%M%S}-{secrets.token_hex(2)}"
    )
    try:
        tenants = _provision(environment, run_id)
    # Anything at all: the run must neither go on half-provisioned nor keep what it made.
    except Exception as exc:
        log.error("provisioning the run's tenants failed: %s", exc)
        _cleanup(environment)
        TENANTS.fail(str(exc))
        if isinstance(runner, MasterRunner):
            runner.send_message(TENANTS_MESSAGE, {"error": str(exc)})
        environment.process_exit_code = 2
        if runner is not None:
            gevent.spawn_later(0.1, runner.quit)
        return
    log.info("run %s: %d tenants provisioned", run_id, len(tenants))
    TENANTS.publish(run_id, tenants)
    if isinstance(runner, MasterRunner):
        runner.send_message(
            TENANTS_MESSAGE, {"run_id": run_id, "tenants": [t.to_json() for t in tenants]}
        )


def _undo() -> bool:
    """Every key the run made revoked, every tenant disabled; False if any call failed."""
    undone = True
    while _provisioner:
        provisioner = _provisioner.pop()
        made = len(provisioner.tenants)
        for failure in provisioner.cleanup():
            log.error("cleanup: %s", failure)
            undone = False
        provisioner.close()
        log.info("run %s: %d tenants' keys revoked, tenants disabled", provisioner.run_id, made)
    return undone


def _cleanup(environment: Environment) -> None:
    if not _undo():
        environment.process_exit_code = 2


def _test_stop(environment: Environment, **_: Any) -> None:
    if not isinstance(environment.runner, WorkerRunner):
        _cleanup(environment)


def _quit(exit_code: int, **_: Any) -> None:
    # Whatever stopped Locust, the tenants do not outlive it (a no-op after test_stop).
    _undo()


def _listen(hook: EventHook, listener: Callable[..., None]) -> None:
    add: Callable[[Callable[..., None]], object] = hook.add_listener  # untyped in Locust
    add(listener)


_listen(events.init_command_line_parser, _arguments)
_listen(events.init, _init)
_listen(events.test_start, _test_start)
_listen(events.test_stop, _test_stop)
_listen(events.quit, _quit)
