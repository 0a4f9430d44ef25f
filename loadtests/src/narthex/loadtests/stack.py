"""The stack a load test runs against when it is local: the `narthex up` of a state
directory (started for the run when none is running, stopped after), and the operator's
key for the run, minted with the admin CLI's own code on that stack's auth database."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from narthex.cli.admin import EXPECTED_ERRORS, Target, auth_settings, error_line, open_service
from narthex.cli.runfile import live_run
from narthex.common.scopes import ADMIN
from narthex.loadtests.provision import ADMIN_KEY_ENV

__all__ = ["AdminKey", "StackError", "admin_key", "gateway_of", "local_stack"]

READY_LINE = "Ctrl-C to stop"
STOP_TIMEOUT_S = 30.0
ACTOR = "loadtest"


class StackError(Exception):
    """No stack to test, or no way to administer it: one line saying why."""


def gateway_of(state_dir: Path) -> str | None:
    """The gateway URL of the `narthex up` running for `state_dir`, if one is."""
    info = live_run(state_dir)
    return info.url("gateway") if info is not None and "gateway" in info.ports else None


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@contextmanager
def local_stack(
    state_dir: Path,
    port_base: int,
    log_path: Path,
    timeout: float = 180.0,
    env: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """`narthex up` for `state_dir` on 127.0.0.1 from `port_base`, until it says it is
    ready; its gateway URL; stopped with Ctrl-C (SIGINT) on exit, as a person would.
    `env`: the children's environment (default: this process's)."""
    argv = [sys.executable, "-m", "narthex.cli.main", "up", "--host", "127.0.0.1"]
    argv += ["--port-base", str(port_base), "--state-dir", str(state_dir)]
    argv += ["--timeout", str(timeout)]
    with log_path.open("wb") as log:
        # A session of its own: a Ctrl-C at the terminal stops Locust, which then still
        # needs the gateway to undo the run's tenants; the stack is stopped after that.
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout + 30.0
        while READY_LINE not in log_path.read_text(errors="replace"):
            if process.poll() is not None:
                raise StackError(f"narthex up exited with {process.returncode}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise StackError(f"narthex up not ready after {timeout} s:\n{_tail(log_path)}")
            time.sleep(0.2)
        url = gateway_of(state_dir)
        if url is None:
            raise StackError(f"narthex up is ready but wrote no run file in {state_dir}")
        yield url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass(frozen=True)
class AdminKey:
    key: str
    key_id: str | None  # None: given by the caller, not ours to revoke


async def _mint(state_dir: Path, name: str, ttl_s: float) -> tuple[str, str]:
    settings = auth_settings(Target(state_dir=state_dir), env="dev")
    async with open_service(settings) as service:
        # The first operator: never an admin tenant an earlier run made (and disabled).
        admins = [
            t
            for t in await service.store.list_tenants()
            if ADMIN in t.roles and t.disabled_at is None and not t.name.startswith("loadtest-")
        ]
        if not admins:
            raise StackError(f"no enabled admin tenant in {state_dir}'s auth database")
        operator = min(admins, key=lambda t: t.created_at)
        expires = datetime.now(UTC) + timedelta(seconds=ttl_s)
        key, record = await service.create_key(operator.id, name, expires, actor=ACTOR)
        return str(key), record.id


async def _revoke(state_dir: Path, key_id: str) -> None:
    settings = auth_settings(Target(state_dir=state_dir), env="dev")
    async with open_service(settings) as service:
        await service.revoke_key(key_id, actor=ACTOR)


@contextmanager
def admin_key(state_dir: Path, url: str, run_id: str, ttl_s: float) -> Iterator[AdminKey]:
    """The caller's admin key (NARTHEX_LOADTEST_ADMIN_KEY) when set; otherwise a fresh key
    of the local stack's operator tenant, made for this run, expiring on its own after
    `ttl_s` and revoked on exit. `url`: the gateway under test, which must be that
    stack's for a key minted there to work."""
    given = os.environ.get(ADMIN_KEY_ENV)
    if given:
        yield AdminKey(given, None)
        return
    local = gateway_of(state_dir)
    if local is not None and local != url:
        raise StackError(
            f"no admin key for {url}: set {ADMIN_KEY_ENV} (only the stack of {state_dir},"
            f" {local}, gets one minted)"
        )
    if not (state_dir / "auth.db").exists():
        raise StackError(
            f"no admin key: set {ADMIN_KEY_ENV}, or point --state-dir at the"
            f" stack's state directory ({state_dir} has no auth database)"
        )
    try:
        key, key_id = asyncio.run(_mint(state_dir, f"loadtest-{run_id}", ttl_s))
    except EXPECTED_ERRORS as exc:
        raise StackError(f"cannot mint an admin key: {error_line(exc)}") from None
    try:
        yield AdminKey(key, key_id)
    finally:
        try:
            asyncio.run(_revoke(state_dir, key_id))
        except EXPECTED_ERRORS as exc:
            print(f"could not revoke the run's admin key {key_id}: {error_line(exc)}")
