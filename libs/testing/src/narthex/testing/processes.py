"""Real processes on loopback for tests, end-to-end runs and benchmarks: the one launcher,
its readiness wait and its stop.

    spec = Spec("auth", module_argv("narthex.auth"), {"NARTHEX_AUTH_PORT": "{port}"})
    with running([spec], directory) as (auth,):
        httpx.get(auth.url + "/v1/...")

`{port}` in a spec's argv or env is replaced by the port the process is given (a free one
unless named). Output goes to `<directory>/<log name>.log`, a file rather than a pipe, so a
chatty child never blocks on a full pipe buffer. A process that exits while being waited
for fails the wait at once with its log's tail.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

__all__ = [
    "HOST",
    "NotReady",
    "Restartable",
    "Service",
    "Spec",
    "free_port",
    "free_port_base",
    "module_argv",
    "port_free",
    "run_service",
    "running",
    "start",
    "stop",
    "wait_answers",
    "wait_ready",
]

HOST = "127.0.0.1"  # loopback only: nothing started here listens on another interface
STOP_TIMEOUT_S = 10.0
_POLL_S = 0.1
_TAIL_CHARS = 2000


class NotReady(RuntimeError):
    """A process exited, or did not answer its ready path in time; says which, with its log."""


def free_port(host: str = HOST) -> int:
    """A port nothing listens on now. The short race with whoever binds it next is accepted
    on a loopback that only the test's own processes use."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_free(port: int, host: str = HOST) -> bool:
    """Whether `port` can be bound now; SO_REUSEADDR as uvicorn binds, so a port left in
    TIME_WAIT counts as free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


_handed_out: set[int] = set()


def free_port_base(count: int = 6) -> int:
    """`count` consecutive free ports for `narthex up --port-base`: by default the five
    services' and the local redis-server's; 7 with `--observe`, whose Prometheus takes the
    next one. Never the same twice in one process.
    From a random start in 20000-29999: on a machine shared by several test runs, the same
    first free ports would be raced for."""
    span = range(20000, 30000 - count, count)
    start = random.randrange(len(span))
    for step in range(len(span)):
        base = span[(start + step) % len(span)]
        if any(base + offset in _handed_out for offset in range(count)):
            continue
        if all(port_free(base + offset) for offset in range(count)):
            _handed_out.update(base + offset for offset in range(count))
            return base
    raise RuntimeError(f"no {count} consecutive free ports")


def module_argv(module: str, *args: str) -> tuple[str, ...]:
    """`python -m module args...` with this interpreter (so the same virtualenv)."""
    return (sys.executable, "-m", module, *args)


@dataclass(frozen=True)
class Spec:
    """One process to start: `{port}` in argv or env is replaced by its port (`port` when
    given, so that processes started together can be told each other's URLs; else a free
    one)."""

    label: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    ready_path: str = "/readyz"
    port: int | None = None


@dataclass
class Service:
    """A started process, where it listens and where its output goes."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log_tail(self, limit: int = _TAIL_CHARS) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return text[-limit:].strip() or "(no output)"

    def log_lines(self) -> list[dict[str, object]]:
        """Every JSON line the service wrote so far (a non-JSON line raises)."""
        text = self.log_path.read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def exited(self) -> NotReady | None:
        """The error to raise if the process has exited, else None."""
        if self.process.poll() is None:
            return None
        return NotReady(
            f"{self.name} exited with {self.process.returncode}; output tail:\n{self.log_tail()}"
        )


def start(
    spec: Spec,
    directory: Path,
    *,
    port: int | None = None,
    log_name: str | None = None,
    cwd: Path | None = None,
    base_env: Mapping[str, str] | None = None,
) -> Service:
    """Start `spec` (not waiting for it) on `port` or a free one; its environment is
    `base_env` (default: this process's) plus the spec's. The caller stops it (`stop`, or
    `running` does)."""
    port = port or spec.port or free_port()
    argv = [a.replace("{port}", str(port)) for a in spec.argv]
    spec_env = {k: v.replace("{port}", str(port)) for k, v in spec.env.items()}
    env = {**(os.environ if base_env is None else base_env), **spec_env}
    log_path = directory / f"{log_name or spec.label}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    return Service(spec.label, f"http://{HOST}:{port}", process, log_path)


def wait_ready(service: Service, timeout: float, path: str = "/readyz") -> None:
    """Return once `path` answers 200; NotReady if the process exits or `timeout` s pass."""
    _wait_until(service, _http_probe(service, path), time.monotonic() + timeout, f"on {path}")


def wait_answers(
    service: Service, probe: Callable[[], str | None], timeout: float, what: str = ""
) -> None:
    """The same wait for a server that is not HTTP (Redis, PostgreSQL): return once
    `probe()` returns None; until then it returns what it saw, quoted if the wait fails."""
    _wait_until(service, probe, time.monotonic() + timeout, what)


def _http_probe(service: Service, path: str) -> Callable[[], str | None]:
    def probe() -> str | None:
        try:
            status = httpx.get(service.url + path, timeout=1.0).status_code
        except httpx.HTTPError as exc:
            return repr(exc)
        return None if status == 200 else f"HTTP {status}"

    return probe


def _wait_until(
    service: Service, probe: Callable[[], str | None], deadline: float, what: str
) -> None:
    last: str | None = "no answer yet"
    while time.monotonic() < deadline:
        if (error := service.exited()) is not None:
            raise error
        if (last := probe()) is None:
            return
        time.sleep(_POLL_S)
    where = f" {what}" if what else ""
    raise NotReady(
        f"{service.name} not ready{where} (last: {last}); output tail:\n{service.log_tail()}"
    )


def stop(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM, then SIGKILL after `timeout` s; returns once the process is gone."""
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Restartable:
    """`spec` on one port for its whole life, so that a test may SIGKILL it and start it
    again where its clients look for it. Each start logs to `<label>-<n>.log`."""

    def __init__(self, spec: Spec, directory: Path, *, cwd: Path | None = None) -> None:
        self.spec = spec
        self.port = spec.port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.directory = directory
        self.cwd = cwd
        self.service: Service | None = None
        self.starts = 0

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self.service.process if self.service is not None else None

    def start(self, timeout: float = 60.0) -> None:
        """Start it and wait until it is ready; NotReady (and stopped) if it is not."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self.starts += 1
        self.service = start(
            self.spec,
            self.directory,
            port=self.port,
            log_name=f"{self.spec.label}-{self.starts}",
            cwd=self.cwd,
        )
        try:
            wait_ready(self.service, timeout, self.spec.ready_path)
        except BaseException:
            self.stop()  # never leave a half-started process behind
            raise

    def kill(self) -> None:
        """SIGKILL: no shutdown of its own, as a crash or the OOM killer would end it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)


@contextmanager
def running(
    specs: Sequence[Spec], directory: Path, timeout: float = 60.0, *, cwd: Path | None = None
) -> Iterator[list[Service]]:
    """Start every spec at once (they boot in parallel), wait until each answers 200 on its
    ready path, stop them all on exit. Logs go to `<directory>/<label>.log`."""
    started: list[tuple[Service, str]] = []
    try:
        for spec in specs:
            started.append((start(spec, directory, cwd=cwd), spec.ready_path))
        deadline = time.monotonic() + timeout
        for service, path in started:
            _wait_until(service, _http_probe(service, path), deadline, f"on {path}")
        yield [service for service, _ in started]
    finally:
        for service, _ in started:  # all signalled first: they stop in parallel
            if service.process.poll() is None:
                service.process.terminate()
        for service, _ in started:
            stop(service.process)


@contextmanager
def run_service(
    name: str, directory: Path, env: Mapping[str, str] | None = None, timeout: float = 60.0
) -> Iterator[Service]:
    """`python -m narthex.<name>` on a free port of 127.0.0.1 (`NARTHEX_<NAME>_HOST`/`_PORT`),
    with `env` on top; ready on /readyz; stopped on exit. The timeout only bounds a broken
    start: on a loaded 2-core machine one service's imports alone have taken 30 s."""
    prefix = f"NARTHEX_{name.upper()}_"
    spec = Spec(
        name,
        module_argv(f"narthex.{name}"),
        # Services default to production; tests run them as `narthex up` does.
        {f"{prefix}HOST": HOST, f"{prefix}PORT": "{port}", f"{prefix}ENV": "dev", **(env or {})},
    )
    with running([spec], directory, timeout) as (service,):
        yield service
