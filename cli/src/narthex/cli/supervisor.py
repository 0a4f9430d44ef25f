"""The supervisor behind `narthex up`: start the services in order, wait until they are
ready, watch them (restarting one that crashes, by `narthex.cli.restarts`), stop them all;
with --observe, a Prometheus scraping them (`narthex.cli.observe`)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Protocol

import httpx

from narthex.cli.localredis import ANALYTICS_OFF, LocalRedis, redis_binary
from narthex.cli.models import build_models, models_dir
from narthex.cli.observe import (
    LISTEN_HOST,
    ObserveError,
    find_observability,
    find_prometheus,
    prometheus_argv,
    prometheus_port,
    render_config,
)
from narthex.cli.restarts import CrashHistory, RestartPolicy
from narthex.cli.runfile import RunInfo, remove_run_file, write_run_file
from narthex.cli.stack import (
    SERVICES,
    UPSTREAMS,
    plan_ports,
    redis_port,
    service_env,
    service_url,
)

if TYPE_CHECKING:
    from narthex.cli.admin import Provisioned

LOG_DIR = "logs"

STOP_GRACE_S = 10.0
POLL_INTERVAL_S = 0.2
LOG_TAIL_LINES = 20
# Connect fails fast on a port nobody listens on yet; the read allows for the gateway's
# /readyz, which itself asks every upstream (up to ~2 s).
PROBE_TIMEOUT = httpx.Timeout(3.0, connect=0.5)
# uvicorn exits 2 only through our settings loader: one line on stderr names the setting.
EXIT_BAD_CONFIG = 2

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class UpOptions:
    host: str = "127.0.0.1"
    port_base: int = 8000
    state_dir: Path = Path(".state")
    timeout: float = 60.0
    restarts: RestartPolicy = field(default_factory=RestartPolicy)
    # Also start Prometheus (Debian's binary) on the port after the services'.
    observe: bool = False


class Clock(Protocol):
    """The supervisor's time: the seam that lets tests run its waits without waiting."""

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class ChildProcess(Protocol):
    """What the supervisor uses of a child's `subprocess.Popen`."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...


# Starts service `name` with `env`, its output going to `log`.
Launch = Callable[[str, Mapping[str, str], IO[bytes]], ChildProcess]


def tail_lines(path: Path, offset: int, count: int = LOG_TAIL_LINES) -> list[str]:
    """The last `count` lines this run wrote (the log is appended across runs)."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return text.splitlines()[-count:]


def _libc_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


def _die_with_parent(prctl: Callable[..., int] | None, parent: int) -> Callable[[], None]:
    """A preexec hook: if the supervisor is SIGKILLed its children get SIGTERM, not orphaned."""

    def hook() -> None:
        if prctl is None:
            return
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        # The parent may have died between fork and prctl: nobody would signal us then.
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class Child:
    """One service: its current process, and its crashes and restarts so far."""

    name: str
    port: int
    url: str
    log_path: Path
    # Where, in the log (appended across runs), this run's output starts, and where the
    # current process's does (later after a restart).
    run_offset: int
    log_offset: int
    process: ChildProcess
    crashes: CrashHistory
    last_probe: str = "no answer yet"
    restarts: int = 0
    restart_at: float | None = None  # crashed: when the backoff ends (monotonic seconds)
    recovering: bool = False  # restarted, not yet answering /readyz


class StopRequested(Exception):
    """SIGINT or SIGTERM reached the supervisor: stop everything, cleanly."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class ChildFailed(Exception):
    """A service exited while starting, or crashed once too often while running."""

    def __init__(self, child: Child, starting: bool) -> None:
        super().__init__(child.name)
        self.child = child
        self.starting = starting


class _ProvisionFailed(Exception):
    pass


@dataclass
class Observer:
    """The Prometheus of `--observe`: not a service, so never restarted; if it dies the
    platform keeps serving and the supervisor says so once."""

    url: str
    log_path: Path
    process: ChildProcess
    reported: bool = False


class _NotReady(Exception):
    def __init__(self, children: Sequence[Child]) -> None:
        super().__init__(", ".join(child.name for child in children))
        self.children = list(children)


class Supervisor:
    """Owns the children of one `narthex up`: start in order, wait ready, watch and
    restart, stop."""

    def __init__(
        self,
        options: UpOptions,
        out: IO[str],
        err: IO[str],
        *,
        clock: Clock | None = None,
        launch: Launch | None = None,
    ) -> None:
        self.options = options
        self.out = out
        self.err = err
        self.clock: Clock = clock or SystemClock()
        self._launch: Launch = launch or self._popen
        self.ports = plan_ports(options.port_base)
        self.log_dir = options.state_dir / LOG_DIR
        self.children: dict[str, Child] = {}
        self.signals: list[int] = []
        self.started_at = datetime.now(UTC).isoformat(timespec="seconds")
        # This run's key for inference, kept for its restarts.
        self.inference_key: str | None = None
        self.observer: Observer | None = None
        # The stack's Redis: the operator's REDIS_URL, or the redis-server started here.
        self.redis_url: str | None = None
        self.local_redis: LocalRedis | None = None
        self._prctl = _libc_prctl()

    # -- output -------------------------------------------------------------------

    def say(self, message: str = "") -> None:
        print(message, file=self.out, flush=True)

    def warn(self, message: str) -> None:
        print(message, file=self.err, flush=True)

    # -- run file -----------------------------------------------------------------

    def run_info(self) -> RunInfo:
        children = {name: child.process.pid for name, child in self.children.items()}
        if self.observer is not None:
            children["prometheus"] = self.observer.process.pid
        return RunInfo(
            pid=os.getpid(),
            host=self.options.host,
            ports=self.ports,
            started_at=self.started_at,
            children=children,
            log_dir=str(self.log_dir),
            restarts={name: child.restarts for name, child in self.children.items()},
        )

    # -- lifecycle ----------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only record it: the loops below notice within POLL_INTERVAL_S and unwind
        # through the same clean-up path as every other way out.
        self.signals.append(signum)

    def run(self) -> int:
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGINT, signal.SIGTERM)
        }
        code = 1
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            write_run_file(self.options.state_dir, self.run_info())
            code = self._start_and_watch()
        finally:
            self.stop_all()
            if self.local_redis is not None:  # last: the services flush their events to it
                self.local_redis.stop()
            remove_run_file(self.options.state_dir)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if self.children:
            # After a failure this belongs with the report on stderr, not with the summary.
            report = self.say if code == 0 else self.warn
            report("narthex: stopped; every service it started is down.")
        return code

    def _start_and_watch(self) -> int:
        try:
            # Before the clock starts: a first build takes minutes (minilm's export).
            build_models(models_dir(self.options.state_dir), [], force=False, out=self.out)
        except Exception as exc:  # a build that fails says why; nothing was started yet
            self.warn(f"narthex: could not build the built-in models: {exc}")
            return 1
        self.redis_url = self.start_redis()
        deadline = self.clock.monotonic() + self.options.timeout
        try:
            # Straight on the auth database, before anything starts: inference needs its
            # own key in its environment.
            provisioned = self.provision()
            self.inference_key = str(provisioned.inference_key)
            with httpx.Client(timeout=PROBE_TIMEOUT, trust_env=False) as client:
                # Upstreams first: the gateway's readiness is theirs, and it proxies to them.
                self.say(f"narthex: starting {', '.join(UPSTREAMS)} ...")
                upstreams = [self.spawn(name) for name in UPSTREAMS]
                self._wait_ready(client, upstreams, deadline)
                self.say("narthex: starting gateway ...")
                gateway = self.spawn("gateway")
                self._wait_ready(client, [gateway], deadline)
                if self.options.observe:
                    self.observe(client, deadline)
                self.print_summary(client, provisioned)
                self._watch(client)
        except StopRequested as stop:
            self.say(f"\nnarthex: {signal.Signals(stop.signum).name} received, stopping ...")
            return 0
        except ChildFailed as failed:
            self.report_failure(failed.child, failed.starting)
            self._say_stopping_rest()
            return 1
        except ObserveError as failed:
            self.warn(f"narthex: {failed}")
            self._say_stopping_rest()
            return 1
        except _ProvisionFailed as failed:
            self.warn(
                "narthex: could not set up the operator, the demo tenant and the inference"
                f" service's identity: {failed}"
            )
            self._say_stopping_rest()
            return 1
        except _NotReady as late:
            for child in late.children:
                self.warn(
                    f"narthex: {child.name} not ready after {self.options.timeout:g} s"
                    f" ({child.url}/readyz: {child.last_probe})"
                )
                self.print_log_tail(child)
            self._say_stopping_rest()
            return 1
        return 1  # _watch only returns through an exception

    def start_redis(self) -> str | None:
        """The stack's Redis URL: REDIS_URL if set, else a private redis-server started
        now if one is installed; None (usage analytics off, said so) otherwise."""
        named = os.environ.get("REDIS_URL")
        if named:
            return named
        binary = redis_binary()
        if binary is None:
            self.warn(ANALYTICS_OFF)
            return None
        local = LocalRedis(binary, redis_port(self.options.port_base), self.options.state_dir)
        try:
            with (self.log_dir / "redis.log").open("ab") as log:
                local.start(log, _die_with_parent(self._prctl, os.getpid()))
        except (OSError, RuntimeError) as exc:
            self.warn(
                f"narthex: could not start redis-server ({exc}; see {self.log_dir}/redis.log):"
                " usage analytics is off"
            )
            return None
        self.local_redis = local
        self.say(f"narthex: redis-server on {local.url} (append-only, data in {local.directory})")
        return local.url

    def _say_stopping_rest(self) -> None:
        processes = [child.process for child in self.children.values()]
        if self.observer is not None:
            processes.append(self.observer.process)
        if any(process.poll() is None for process in processes):
            self.warn("narthex: stopping the services still running ...")

    def _popen(self, name: str, env: Mapping[str, str], log: IO[bytes]) -> ChildProcess:
        return self._popen_argv([sys.executable, "-m", f"narthex.{name}"], env, log)

    def _popen_argv(
        self, argv: Sequence[str], env: Mapping[str, str], log: IO[bytes]
    ) -> ChildProcess:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            # Its own process group: a terminal's Ctrl-C reaches only the supervisor,
            # which then stops the children in order and reports how that went.
            process_group=0,
            preexec_fn=_die_with_parent(self._prctl, os.getpid()),
        )

    def _start(self, name: str) -> tuple[ChildProcess, int]:
        """A new process for `name`, and where its output starts in the log."""
        env = service_env(
            name,
            self.options.host,
            self.ports,
            self.options.state_dir,
            self.inference_key,
            self.redis_url,
        )
        with (self.log_dir / f"{name}.log").open("ab") as log:
            offset = log.tell()  # the end of what earlier runs and processes wrote
            # The child gets its own copy of the descriptor; ours can close right away.
            return self._launch(name, env, log), offset

    def spawn(self, name: str) -> Child:
        process, offset = self._start(name)
        child = Child(
            name=name,
            port=self.ports[name],
            url=service_url(self.options.host, self.ports[name]),
            log_path=self.log_dir / f"{name}.log",
            run_offset=offset,
            log_offset=offset,
            process=process,
            crashes=CrashHistory(self.options.restarts),
        )
        self.children[name] = child
        write_run_file(self.options.state_dir, self.run_info())
        return child

    def _check_starting(self) -> None:
        """While starting, any exit ends the run: a service that cannot start once (a
        refused setting, a taken port) would not start on a retry either."""
        if self.signals:
            raise StopRequested(self.signals[0])
        for child in self.children.values():
            if child.process.poll() is not None:
                raise ChildFailed(child, starting=True)

    def probe(self, client: httpx.Client, child: Child) -> bool:
        try:
            response = client.get(f"{child.url}/readyz")
        except httpx.HTTPError as exc:
            child.last_probe = type(exc).__name__
            return False
        child.last_probe = f"{response.status_code} {response.text[:200]}"
        return response.status_code == 200

    def _wait_ready(self, client: httpx.Client, children: list[Child], deadline: float) -> None:
        pending = list(children)
        while True:
            self._check_starting()
            pending = [child for child in pending if not self.probe(client, child)]
            if not pending:
                return
            if self.clock.monotonic() >= deadline:
                raise _NotReady(pending)
            self.clock.sleep(POLL_INTERVAL_S)

    def observe(self, client: httpx.Client, deadline: float) -> None:
        """Prometheus with the project's config and rules, scraping this run's services;
        returns once it answers /-/ready. `ObserveError` if it cannot start."""
        config = render_config(find_observability(), self.options.host, self.ports)
        port = prometheus_port(self.options.port_base)
        argv = prometheus_argv(find_prometheus(), self.options.state_dir, config, port)
        self.say("narthex: starting prometheus ...")
        log_path = self.log_dir / "prometheus.log"
        with log_path.open("ab") as log:
            offset = log.tell()
            process = self._popen_argv(argv, dict(os.environ), log)
        self.observer = Observer(f"http://{LISTEN_HOST}:{port}", log_path, process)
        write_run_file(self.options.state_dir, self.run_info())
        last = "no answer yet"
        while True:
            self._check_starting()
            code = process.poll()
            if code is not None:
                tail = "\n".join(tail_lines(log_path, offset))
                raise ObserveError(f"prometheus {describe_exit(code)} while starting:\n{tail}")
            try:
                response = client.get(f"{self.observer.url}/-/ready")
                if response.status_code == 200:
                    return
                last = f"{response.status_code} {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            if self.clock.monotonic() >= deadline:
                raise ObserveError(
                    f"prometheus not ready after {self.options.timeout:g} s"
                    f" ({self.observer.url}/-/ready: {last}); log: {log_path}"
                )
            self.clock.sleep(POLL_INTERVAL_S)

    def _watch(self, client: httpx.Client) -> None:
        while True:
            self.watch_once(client)
            self.clock.sleep(POLL_INTERVAL_S)

    def watch_once(self, client: httpx.Client) -> None:
        """One look at every service once all are up: a crash is scheduled for a restart
        (or ends the run: `ChildFailed`), a restart whose backoff is over happens, and a
        restarted service that answers /readyz again is announced. The others keep
        serving throughout: theirs is to degrade while a dependency is away."""
        if self.signals:
            raise StopRequested(self.signals[0])
        observer = self.observer
        if observer is not None and not observer.reported:
            code = observer.process.poll()
            if code is not None:
                observer.reported = True
                self.warn(
                    f"narthex: prometheus {describe_exit(code)}; the services keep running"
                    f" without it (log: {observer.log_path})"
                )
        for child in self.children.values():
            if child.restart_at is not None:
                if self.clock.monotonic() >= child.restart_at:
                    self._restart(child)
                continue
            code = child.process.poll()
            if code is not None:
                self._crashed(child, code)
            elif child.recovering and self.probe(client, child):
                child.recovering = False
                self.say(f"narthex: {child.name} is ready again")

    def _crashed(self, child: Child, code: int) -> None:
        policy = self.options.restarts
        delay = child.crashes.record(self.clock.monotonic())
        # A refused configuration would be refused again: no point restarting.
        if delay is None or code == EXIT_BAD_CONFIG:
            raise ChildFailed(child, starting=False)
        child.recovering = False
        child.restart_at = self.clock.monotonic() + delay
        self.warn(
            f"narthex: {child.name} {describe_exit(code)}; restarting it in {delay:g} s"
            f" ({_crashes(child.crashes.recent)} within {policy.window:g} s;"
            f" {policy.max_crashes} stop everything)"
        )

    def _restart(self, child: Child) -> None:
        child.process, child.log_offset = self._start(child.name)
        child.restart_at = None
        child.recovering = True
        child.restarts += 1
        child.last_probe = "no answer yet"
        write_run_file(self.options.state_dir, self.run_info())
        self.say(f"narthex: {child.name} restarted (pid {child.process.pid})")

    def provision(self) -> Provisioned:
        """The operator tenant (first run only), the demo tenant, the inference service's
        identity, and this run's keys for the demo tenant and inference."""
        # Imported here: the auth service's stack costs seconds, which `status` need not pay.
        from narthex.cli.admin import AdminError, provision_sync

        try:
            return provision_sync(self.options.state_dir)
        except AdminError as exc:
            raise _ProvisionFailed(str(exc)) from None

    def print_summary(self, client: httpx.Client, provisioned: Provisioned) -> None:
        gateway = self.children["gateway"].url
        try:
            body = client.get(f"{gateway}/readyz").json()
            checks = body.get("checks", {})
            upstreams = ", ".join(
                f"{name} {checks.get(name, {}).get('status', '?')}" for name in UPSTREAMS
            )
            readiness = f"{body.get('status', '?')} ({upstreams})"
        except (httpx.HTTPError, ValueError, AttributeError):
            readiness = "no answer"
        width = max(len(name) for name in SERVICES)
        self.say("\nnarthex is up:")
        for name in SERVICES:
            child = self.children[name]
            self.say(f"  {name:<{width}}  {child.url}  (pid {child.process.pid})")
        self.say("")
        self.say(f"  readiness  {gateway}/readyz: {readiness}")
        self.say(f"  API docs   {gateway}/docs")
        self.say(f"  logs       {self.log_dir}/<service>.log")
        self.say(f"  status     curl -s {gateway}/v1/status/inference")
        self.say(f"  dashboard  {gateway}/dashboard  (paste the demo key)")
        self.say(f"  analytics  {'on: ' + self.redis_url if self.redis_url else 'off (no Redis)'}")
        if self.observer is not None:
            self.say(
                f"  prometheus {self.observer.url}/targets  (pid {self.observer.process.pid};"
                " recording rules at /rules, alerts at /alerts)"
            )
        self.say("")
        if provisioned.operator_key is not None:
            self.say(f"  operator key (shown once, keep it): {provisioned.operator_key}")
        else:
            self.say(
                "  operator   bootstrapped by an earlier run (its key was shown then;"
                f" `narthex keys create --tenant {shlex.quote(provisioned.operator)}"
                f" --state-dir {shlex.quote(str(self.options.state_dir))}`"
                " makes another)"
            )
        demo = provisioned.demo
        self.say(f"  demo       tenant {demo.name} ({demo.id}), plan {demo.plan_name}")
        retired = f", {provisioned.revoked} earlier one(s) revoked" if provisioned.revoked else ""
        self.say(f"  demo key   {provisioned.demo_key}  (new each run{retired})")
        self.say(
            f'  try        curl -s -H "Authorization: Bearer {provisioned.demo_key}"'
            f" {gateway}/v1/keys"
        )
        self.say(
            f'  usage      curl -s -H "Authorization: Bearer {provisioned.demo_key}"'
            f" {gateway}/v1/usage"
        )
        self.say(
            f'  embed      curl -s -H "Authorization: Bearer {provisioned.demo_key}"'
            f" -H 'Content-Type: application/json'"
            f""" -d '{{"model": "minilm", "input": "hello narthex"}}' {gateway}/v1/embeddings"""
        )
        self.say("\nCtrl-C to stop.")

    def report_failure(self, child: Child, starting: bool) -> None:
        code = child.process.wait()  # it has exited: this only reads its code
        when = "while starting" if starting else "while running"
        if not starting and code != EXIT_BAD_CONFIG:
            policy = self.options.restarts
            when += f" ({_crashes(child.crashes.recent)} within {policy.window:g} s): giving up"
        if code == EXIT_BAD_CONFIG:
            lines = tail_lines(child.log_path, child.log_offset)
            # The refusal is the one plain line among the JSON log lines.
            plain = [line for line in lines if line.strip() and not line.startswith("{")]
            reason = plain[-1] if plain else "see its log"
            self.warn(f"narthex: {child.name} refused its configuration (exit code 2): {reason}")
            self.warn(f"narthex: log: {child.log_path}")
            return
        self.warn(f"narthex: {child.name} {describe_exit(code)} {when}")
        self.print_log_tail(child)

    def print_log_tail(self, child: Child) -> None:
        # This run's, not just the last process's: one killed at once leaves no lines.
        lines = tail_lines(child.log_path, child.run_offset)
        if not lines:
            self.warn(f"narthex: {child.log_path} has nothing from this run yet")
            return
        self.warn(f"--- last {len(lines)} lines of {child.log_path} ---")
        for line in lines:
            self.warn(line)
        self.warn("---")

    def stop_all(self) -> None:
        """SIGTERM every child (prometheus, then the gateway first of the services), wait up
        to STOP_GRACE_S, then SIGKILL."""
        named = [(c.name, c.process) for c in reversed(self.children.values())]
        if self.observer is not None:
            named.insert(0, ("prometheus", self.observer.process))
        running = [(name, process) for name, process in named if process.poll() is None]
        if not running:
            return
        for _, process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = self.clock.monotonic() + STOP_GRACE_S
        while self.clock.monotonic() < deadline and any(p.poll() is None for _, p in running):
            self.clock.sleep(0.05)
        for name, process in running:
            if process.poll() is None:
                self.warn(f"narthex: {name} ignored SIGTERM for {STOP_GRACE_S:g} s; killing")
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                process.wait()


def _crashes(count: int) -> str:
    return f"{count} crash" if count == 1 else f"{count} crashes"
