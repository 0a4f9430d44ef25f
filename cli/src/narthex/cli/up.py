"""`narthex up` and `narthex status`: refuse a second start (or one whose ports are taken, or
whose --observe cannot work), hand over to the supervisor, report on a running one."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import IO

import httpx

from narthex.cli.localredis import redis_binary
from narthex.cli.observe import (
    LISTEN_HOST,
    ObserveError,
    find_observability,
    find_prometheus,
    prometheus_port,
)
from narthex.cli.runfile import RUN_FILE, exclusive_lock, live_run, read_run_file
from narthex.cli.stack import SERVICES, plan_ports, port_in_use, redis_port
from narthex.cli.supervisor import PROBE_TIMEOUT, Supervisor, UpOptions


def run_up(options: UpOptions, out: IO[str] = sys.stdout, err: IO[str] = sys.stderr) -> int:
    """`narthex up`: the exit code (0 after a clean stop, 1 on any failure or refusal)."""
    state_dir = options.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(state_dir) as locked:
        # The run file catches a supervisor whose lock file was deleted under it.
        running = live_run(state_dir)
        if not locked or running is not None:
            detail = ""
            if running is not None:
                gateway = running.url("gateway") if "gateway" in running.ports else "?"
                detail = f" (pid {running.pid}, gateway {gateway}, since {running.started_at})"
            print(
                f"narthex is already running for {state_dir}{detail}."
                " Stop it with Ctrl-C in its terminal, or `narthex status` to check it.",
                file=err,
                flush=True,
            )
            return 1
        wanted = [
            (name, options.host, port) for name, port in plan_ports(options.port_base).items()
        ]
        if not os.environ.get("REDIS_URL") and redis_binary() is not None:
            wanted.append(("redis-server", options.host, redis_port(options.port_base)))
        if options.observe:
            # Before anything starts: a missing prometheus would otherwise surface only
            # after the services' start-up.
            try:
                find_prometheus()
                find_observability()
            except ObserveError as exc:
                print(f"narthex: {exc}; nothing was started.", file=err, flush=True)
                return 1
            wanted.append(("prometheus", LISTEN_HOST, prometheus_port(options.port_base)))
        for name, host, port in wanted:
            if port_in_use(host, port):
                print(
                    f"narthex: port {port} ({name}) on {host} is already in use"
                    " by another process; nothing was started. Free it or pick another"
                    " --port-base.",
                    file=err,
                    flush=True,
                )
                return 1
        return Supervisor(options, out, err).run()


def run_status(state_dir: Path, out: IO[str] = sys.stdout) -> int:
    """`narthex status`: each service's readiness and restarts; 0 when every one answers
    /readyz 200, 1 otherwise."""
    info = live_run(state_dir)
    if info is None:
        stale = read_run_file(state_dir)
        why = (
            f"{state_dir / RUN_FILE} names pid {stale.pid}, which is gone"
            if stale is not None
            else f"no {state_dir / RUN_FILE}"
        )
        print(f"narthex is not running ({why}).", file=out)
        return 1
    print(f"narthex supervisor pid {info.pid}, started {info.started_at}", file=out)
    width = max(len(name) for name in SERVICES)
    all_ready = True
    with httpx.Client(timeout=PROBE_TIMEOUT, trust_env=False) as client:
        for name in SERVICES:
            if name not in info.ports:
                all_ready = False
                continue
            url = info.url(name)
            try:
                status_code = client.get(f"{url}/readyz").status_code
                state = "ready" if status_code == 200 else f"not ready ({status_code})"
            except httpx.HTTPError as exc:
                status_code, state = 0, f"down ({type(exc).__name__})"
            all_ready = all_ready and status_code == 200
            pid = info.children.get(name, "-")
            restarts = info.restarts.get(name, 0)
            print(
                f"  {name:<{width}}  {url:<24}  pid {pid!s:<8}  restarts {restarts:<3}  {state}",
                file=out,
            )
    return 0 if all_ready else 1
