"""`make loadtest`: Locust headless against a stack (the running one, or one started for the
run), an HTML report and CSVs under `<state-dir>/loadtests/<time>/`, the SLA verdict last.

Exit codes: 0 the SLA is met, 1 it is breached (each breach named), 2 no verdict (no stack,
Locust failed to run, or the SLA file is unusable).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

from narthex.loadtests import sla
from narthex.loadtests.scenario import CLASS_NAMES, ScenarioError, load_scenario
from narthex.loadtests.stack import StackError, admin_key, gateway_of, local_stack

__all__ = ["main", "parse_duration"]

HERE = Path(__file__).resolve().parents[3]  # loadtests/
LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")
STATS_PREFIX = "stats"
# How long users may finish their task once the time is up (Locust's --stop-timeout).
STOP_TIMEOUT_S = 10
# How long Locust may take to stop and clean up after a Ctrl-C.
LOCUST_QUIT_S = 60.0
_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?$")


def parse_duration(text: str) -> int:
    """Seconds from Locust's duration syntax: `90`, `90s`, `2m`, `1h30m`."""
    match = _DURATION.match(text.strip())
    if not text.strip() or match is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 60s, 5m, 1h30m)")
    hours, minutes, seconds = (int(part or 0) for part in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total < 1:
        raise argparse.ArgumentTypeError("a duration of at least 1 s")
    return total


def _shipped(folder: str) -> Callable[[str], Path]:
    """A path as given, or the name of a file shipped in `loadtests/<folder>/`."""

    def resolve(text: str) -> Path:
        path = Path(text)
        shipped = HERE / folder / f"{text}.yaml"
        return shipped if not path.exists() and shipped.exists() else path

    return resolve


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="narthex-loadtest",
        description=(
            "Run the load test headless against a narthex gateway and judge it against an"
            " SLA file. Without --url: the stack `narthex up` runs for --state-dir, or one"
            " started for the run and stopped after."
        ),
    )
    parser.add_argument("--url", help="the gateway to test (default: the local stack's)")
    parser.add_argument("--state-dir", type=Path, default=Path(".state"))
    parser.add_argument(
        "--port-base", type=int, default=8000, help="where a stack started for the run listens"
    )
    parser.add_argument("--duration", type=parse_duration, default=parse_duration("60s"))
    parser.add_argument("--users", type=int, default=12, help="concurrent users in all")
    parser.add_argument("--spawn-rate", type=float, default=4.0, help="users started per second")
    parser.add_argument(
        "--scenario",
        type=_shipped("scenarios"),
        default=HERE / "scenarios" / "mix.yaml",
        help="a scenario file, or the name of one in loadtests/scenarios (mix, noisy-neighbour)",
    )
    parser.add_argument(
        "--sla",
        type=_shipped("sla"),
        default=HERE / "sla" / "default.yaml",
        help="an SLA file, or the name of one in loadtests/sla (default, smoke, impossible)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        help="Locust worker processes on this machine (0: one process; -1: one per core)",
    )
    parser.add_argument("--out", type=Path, help="default: <state-dir>/loadtests/<UTC time>")
    return parser


@contextmanager
def _target(args: argparse.Namespace, out: Path) -> Iterator[str]:
    if args.url:
        yield args.url.rstrip("/")
        return
    running = gateway_of(args.state_dir)
    if running is not None:
        print(f"testing the running stack of {args.state_dir}: {running}", flush=True)
        yield running
        return
    print(
        f"no stack running for {args.state_dir}: starting `narthex up` on port"
        f" {args.port_base} (log: {out / 'up.log'})",
        flush=True,
    )
    with local_stack(args.state_dir, args.port_base, out / "up.log") as url:
        print(f"started: {url}", flush=True)
        yield url


def locust_argv(args: argparse.Namespace, url: str, out: Path, run_id: str) -> list[str]:
    scenario = load_scenario(args.scenario)
    classes = [CLASS_NAMES[name] for name in scenario.users]
    if scenario.flood is not None:
        classes.append(CLASS_NAMES["flood"])
    argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless"]
    argv += ["--host", url, "--users", str(args.users), "--spawn-rate", str(args.spawn_rate)]
    argv += ["--run-time", f"{args.duration}s", "--stop-timeout", str(STOP_TIMEOUT_S)]
    argv += ["--csv", str(out / STATS_PREFIX), "--csv-full-history"]
    argv += ["--html", str(out / "report.html"), "--only-summary"]
    argv += ["--logfile", str(out / "locust.log"), "--exit-code-on-error", "0"]
    argv += ["--scenario", str(args.scenario), "--run-id", run_id]
    if args.processes:
        argv += ["--processes", str(args.processes)]
    return [*argv, *classes]


def _check_users(args: argparse.Namespace) -> None:
    scenario = load_scenario(args.scenario)
    needed = len(scenario.users) + (scenario.flood.users if scenario.flood else 0)
    if args.users < needed:
        raise ScenarioError(
            f"--users {args.users} is fewer than the scenario's {needed} kinds of user"
            " (and flood users): some would never run"
        )


def _wait_or_kill(process: subprocess.Popen[bytes]) -> None:
    try:
        process.wait(timeout=LOCUST_QUIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    now = datetime.now(UTC)
    run_id = f"{now:%Y%m%d%H%M%S}-{secrets.token_hex(2)}"
    out: Path = args.out or args.state_dir / "loadtests" / f"{now:%Y%m%dT%H%M%SZ}"
    out.mkdir(parents=True, exist_ok=True)
    try:
        _check_users(args)
        sla.load_sla(args.sla)  # an unusable SLA file is refused before any load
    except (ScenarioError, sla.SlaError) as exc:
        print(f"not run: {exc}", file=sys.stderr, flush=True)
        return 2
    code = 0
    try:
        with ExitStack() as stack:
            url = stack.enter_context(_target(args, out))
            key = stack.enter_context(
                admin_key(args.state_dir, url, run_id, args.duration + 3600.0)
            )
            env = {**os.environ, "NARTHEX_LOADTEST_ADMIN_KEY": key.key}
            print(
                f"run {run_id}: {args.users} users for {args.duration} s against {url};"
                f" report and CSVs in {out}",
                flush=True,
            )
            locust = subprocess.Popen(locust_argv(args, url, out, run_id), env=env)
            try:
                code = locust.wait()
            except KeyboardInterrupt:
                # Locust got the Ctrl-C too: it stops its users and undoes the run's
                # tenants (the stack, in a session of its own, is still there for that).
                _wait_or_kill(locust)
                print("interrupted: no SLA verdict", file=sys.stderr, flush=True)
                return 130
    except StackError as exc:
        print(f"not run: {exc}", file=sys.stderr, flush=True)
        return 2
    stats = out / f"{STATS_PREFIX}_stats.csv"
    if code != 0 or not stats.exists():
        print(
            f"Locust exited with {code} (log: {out / 'locust.log'}): no SLA verdict",
            file=sys.stderr,
            flush=True,
        )
        return 2
    print(f"\nHTML report: {out / 'report.html'}\n", flush=True)
    return sla.check(stats, args.sla, sys.stdout)


if __name__ == "__main__":
    raise SystemExit(main())
