"""Local supervisor behind `narthex up` and `narthex status`: start, watch and stop the services."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

import httpx

from narthex.cli.models import build_models, models_dir
from narthex.cli.paths import auth_database_url, signing_keys_dir

if TYPE_CHECKING:
    from narthex.cli.admin import Provisioned

# Port order (port_base + index) and URL order; the gateway is first here but started last.
SERVICES: tuple[str, ...] = ("gateway", "auth", "features", "inference", "analytics")
UPSTREAMS: tuple[str, ...] = SERVICES[1:]

RUN_FILE = "up.json"
LOCK_FILE = "up.lock"
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


@dataclass(frozen=True)
class RunInfo:
    """What `<state-dir>/up.json` says about a supervisor."""

    pid: int
    host: str
    ports: dict[str, int]
    started_at: str
    children: dict[str, int] = field(default_factory=dict)
    log_dir: str = ""

    def url(self, service: str) -> str:
        return service_url(self.host, self.ports[service])

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "host": self.host,
            "ports": self.ports,
            "urls": {name: self.url(name) for name in self.ports},
            "started_at": self.started_at,
            "children": self.children,
            "log_dir": self.log_dir,
        }

    @classmethod
    def from_json(cls, data: Any) -> RunInfo:
        if not isinstance(data, dict):
            raise ValueError("run file is not a JSON object")
        ports = {str(k): int(v) for k, v in dict(data["ports"]).items()}
        children = {str(k): int(v) for k, v in dict(data.get("children") or {}).items()}
        return cls(
            pid=int(data["pid"]),
            host=str(data["host"]),
            ports=ports,
            started_at=str(data["started_at"]),
            children=children,
            log_dir=str(data.get("log_dir") or ""),
        )


def plan_ports(port_base: int) -> dict[str, int]:
    return {name: port_base + index for index, name in enumerate(SERVICES)}


def connect_host(host: str) -> str:
    """Where a client reaches a server bound to `host` (wildcards mean this machine)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def service_url(host: str, port: int) -> str:
    return f"http://{connect_host(host)}:{port}"


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    # A zombie answers kill(0) but is not running anything.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def read_run_file(state_dir: Path) -> RunInfo | None:
    """The run file if it exists and parses; a torn or foreign file counts as absent."""
    try:
        return RunInfo.from_json(json.loads((state_dir / RUN_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def looks_like_supervisor(pid: int) -> bool:
    """Whether `pid` runs narthex: after a crash (or a container restart) the pid in a
    stale run file may belong to an unrelated process, which must not block a start."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no procfs to ask: trust the pid
    return b"narthex" in cmdline


def live_run(state_dir: Path) -> RunInfo | None:
    """The run file only if its supervisor is still alive: a crash leaves a stale one."""
    info = read_run_file(state_dir)
    if info is None or info.pid == os.getpid():
        return None
    if not (pid_alive(info.pid) and looks_like_supervisor(info.pid)):
        return None
    return info


def write_run_file(state_dir: Path, info: RunInfo) -> None:
    # Write then rename, so `narthex status` never reads half a file.
    path = state_dir / RUN_FILE
    tmp = path.with_name(f".{RUN_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info.to_json(), indent=2) + "\n")
    tmp.replace(path)


def remove_run_file(state_dir: Path) -> None:
    info = read_run_file(state_dir)
    if info is not None and info.pid == os.getpid():
        (state_dir / RUN_FILE).unlink(missing_ok=True)


@contextlib.contextmanager
def exclusive_lock(state_dir: Path) -> Iterator[bool]:
    """Hold `up.lock` for the block; yields False when another supervisor holds it."""
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        # Closing releases the lock. The file stays: unlinking it would let a third
        # process lock a fresh inode while a second still waits on the old one.
        os.close(fd)


def port_in_use(host: str, port: int) -> bool:
    """Whether binding `host:port` fails the way the service's own bind would."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror:
        return False  # the service will report the bad host itself
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # uvicorn sets SO_REUSEADDR too: a port in TIME_WAIT is free for it, so for us.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError:
            return True
    return False


def _shared_redis(env: dict[str, str], prefix: str) -> None:
    if os.environ.get("REDIS_URL") and f"{prefix}REDIS_URL" not in os.environ:
        env[f"{prefix}REDIS_URL"] = os.environ["REDIS_URL"]


def service_env(
    service: str,
    host: str,
    ports: dict[str, int],
    state_dir: Path,
    inference_key: str | None = None,
) -> dict[str, str]:
    """The child's environment: the caller's, with everything `up` decides set explicitly.

    `inference_key`: the inference service's own API key (this run's), which it exchanges
    at auth for the token it reads features with."""
    prefix = f"NARTHEX_{service.upper()}_"
    env = dict(os.environ)
    env.update(
        {
            f"{prefix}HOST": host,
            f"{prefix}PORT": str(ports[service]),
            f"{prefix}ENV": "dev",
            f"{prefix}LOG_JSON": "true",
            # Log lines reach the file as they happen, not when a buffer fills.
            "PYTHONUNBUFFERED": "1",
        }
    )
    if service == "gateway":
        for upstream in UPSTREAMS:
            env[f"{prefix}{upstream.upper()}_URL"] = service_url(host, ports[upstream])
        # Shared limits when the operator names a Redis; in-process limits otherwise,
        # which are exact for this single-gateway stack.
        _shared_redis(env, prefix)
    if service not in ("gateway", "auth"):
        # Internal services verify callers' tokens against this auth's JWKS themselves.
        env[f"{prefix}AUTH_URL"] = service_url(host, ports["auth"])
    if service == "features":
        # The online store in Redis when the operator names one; in process otherwise.
        _shared_redis(env, prefix)
    if service == "inference":
        env[f"{prefix}MODEL_REPOSITORY"] = str(models_dir(state_dir))
        env[f"{prefix}FEATURES_URL"] = service_url(host, ports["features"])
        if inference_key is not None:
            env[f"{prefix}SERVICE_KEY"] = inference_key
    if service == "auth":
        # In the state directory, not the caller's env or working directory: each
        # --state-dir is a platform of its own, tenants and keys included.
        env[f"{prefix}DATABASE_URL"] = auth_database_url(state_dir)
        env[f"{prefix}SIGNING_KEYS_DIR"] = str(signing_keys_dir(state_dir))
    return env


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
    name: str
    port: int
    url: str
    log_path: Path
    log_offset: int
    process: subprocess.Popen[bytes]
    last_probe: str = "no answer yet"


class _Stop(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _ChildFailed(Exception):
    def __init__(self, child: Child, starting: bool) -> None:
        super().__init__(child.name)
        self.child = child
        self.starting = starting


class _ProvisionFailed(Exception):
    pass


class _NotReady(Exception):
    def __init__(self, children: Sequence[Child]) -> None:
        super().__init__(", ".join(child.name for child in children))
        self.children = list(children)


class Supervisor:
    """Owns the children of one `narthex up`: start in order, wait ready, watch, stop."""

    def __init__(self, options: UpOptions, out: IO[str], err: IO[str]) -> None:
        self.options = options
        self.out = out
        self.err = err
        self.ports = plan_ports(options.port_base)
        self.log_dir = options.state_dir / LOG_DIR
        self.children: dict[str, Child] = {}
        self.signals: list[int] = []
        self.started_at = datetime.now(UTC).isoformat(timespec="seconds")
        self._prctl = _libc_prctl()

    # -- output -------------------------------------------------------------------

    def say(self, message: str = "") -> None:
        print(message, file=self.out, flush=True)

    def warn(self, message: str) -> None:
        print(message, file=self.err, flush=True)

    # -- run file -----------------------------------------------------------------

    def run_info(self) -> RunInfo:
        return RunInfo(
            pid=os.getpid(),
            host=self.options.host,
            ports=self.ports,
            started_at=self.started_at,
            children={name: child.process.pid for name, child in self.children.items()},
            log_dir=str(self.log_dir),
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
        deadline = time.monotonic() + self.options.timeout
        try:
            # Straight on the auth database, before anything starts: inference needs its
            # own key in its environment.
            provisioned = self.provision()
            with httpx.Client(timeout=PROBE_TIMEOUT, trust_env=False) as client:
                # Upstreams first: the gateway's readiness is theirs, and it proxies to them.
                self.say(f"narthex: starting {', '.join(UPSTREAMS)} ...")
                upstreams = [
                    self.spawn(name, inference_key=str(provisioned.inference_key))
                    for name in UPSTREAMS
                ]
                self._wait_ready(client, upstreams, deadline)
                self.say("narthex: starting gateway ...")
                gateway = self.spawn("gateway")
                self._wait_ready(client, [gateway], deadline)
                self.print_summary(client, provisioned)
            self._watch()
        except _Stop as stop:
            self.say(f"\nnarthex: {signal.Signals(stop.signum).name} received, stopping ...")
            return 0
        except _ChildFailed as failed:
            self.report_failure(failed.child, failed.starting)
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

    def _say_stopping_rest(self) -> None:
        if any(child.process.poll() is None for child in self.children.values()):
            self.warn("narthex: stopping the services still running ...")

    def spawn(self, name: str, inference_key: str | None = None) -> Child:
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            # The child gets its own copy of the descriptor; ours can close right away.
            process = subprocess.Popen(
                [sys.executable, "-m", f"narthex.{name}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=service_env(
                    name, self.options.host, self.ports, self.options.state_dir, inference_key
                ),
                # Its own process group: a terminal's Ctrl-C reaches only the supervisor,
                # which then stops the children in order and reports how that went.
                process_group=0,
                preexec_fn=_die_with_parent(self._prctl, os.getpid()),
            )
            offset = log.tell()
        child = Child(
            name=name,
            port=self.ports[name],
            url=service_url(self.options.host, self.ports[name]),
            log_path=log_path,
            log_offset=offset,
            process=process,
        )
        self.children[name] = child
        write_run_file(self.options.state_dir, self.run_info())
        return child

    def _check(self, starting: bool) -> None:
        if self.signals:
            raise _Stop(self.signals[0])
        for child in self.children.values():
            if child.process.poll() is not None:
                raise _ChildFailed(child, starting)

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
            self._check(starting=True)
            pending = [child for child in pending if not self.probe(client, child)]
            if not pending:
                return
            if time.monotonic() >= deadline:
                raise _NotReady(pending)
            time.sleep(POLL_INTERVAL_S)

    def _watch(self) -> None:
        while True:
            self._check(starting=False)
            time.sleep(POLL_INTERVAL_S)

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
            f'  embed      curl -s -H "Authorization: Bearer {provisioned.demo_key}"'
            f" -H 'Content-Type: application/json'"
            f""" -d '{{"model": "minilm", "input": "hello narthex"}}' {gateway}/v1/embeddings"""
        )
        self.say("\nCtrl-C to stop.")

    def report_failure(self, child: Child, starting: bool) -> None:
        code = child.process.returncode
        when = "while starting" if starting else "while running"
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
        lines = tail_lines(child.log_path, child.log_offset)
        if not lines:
            self.warn(f"narthex: {child.log_path} has nothing from this run yet")
            return
        self.warn(f"--- last {len(lines)} lines of {child.log_path} ---")
        for line in lines:
            self.warn(line)
        self.warn("---")

    def stop_all(self) -> None:
        """SIGTERM every child (gateway first), wait up to STOP_GRACE_S, then SIGKILL."""
        running = [c for c in reversed(self.children.values()) if c.process.poll() is None]
        if not running:
            return
        for child in running:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and any(c.process.poll() is None for c in running):
            time.sleep(0.05)
        for child in running:
            if child.process.poll() is None:
                self.warn(f"narthex: {child.name} ignored SIGTERM for {STOP_GRACE_S:g} s; killing")
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                child.process.wait()


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
        ports = plan_ports(options.port_base)
        for name in SERVICES:
            if port_in_use(options.host, ports[name]):
                print(
                    f"narthex: port {ports[name]} ({name}) on {options.host} is already in use"
                    " by another process; nothing was started. Free it or pick another"
                    " --port-base.",
                    file=err,
                    flush=True,
                )
                return 1
        return Supervisor(options, out, err).run()


def run_status(state_dir: Path, out: IO[str] = sys.stdout) -> int:
    """`narthex status`: 0 when every service answers /readyz 200, 1 otherwise."""
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
            print(f"  {name:<{width}}  {url:<24}  pid {pid!s:<8}  {state}", file=out)
    return 0 if all_ready else 1
