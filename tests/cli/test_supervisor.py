"""The supervisor's watch loop on a fake clock and fake processes: restarts with backoff,
the others untouched, giving up, stopping. (tests/cli/test_up.py does it for real.)"""

from __future__ import annotations

import contextlib
import io
import itertools
import signal
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import pytest

from narthex.cli.restarts import RestartPolicy
from narthex.cli.runfile import read_run_file
from narthex.cli.stack import SERVICES
from narthex.cli.supervisor import (
    STOP_GRACE_S,
    ChildFailed,
    ChildProcess,
    Observer,
    StopRequested,
    Supervisor,
    UpOptions,
)

_pids = itertools.count(40_000)


class FakeClock:
    """Time moves only when the test (or the supervisor's sleep) moves it."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class FakeProcess:
    name: str
    pid: int = field(default_factory=lambda: next(_pids))
    returncode: int | None = None
    ignores_sigterm: bool = False
    signals: list[int] = field(default_factory=list)

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)
        if not self.ignores_sigterm:
            self.returncode = -sig

    def kill(self) -> None:
        self.signals.append(signal.SIGKILL)
        self.returncode = -signal.SIGKILL

    def wait(self, timeout: float | None = None) -> int:
        assert self.returncode is not None, "waited on a running process"
        return self.returncode


@dataclass
class Launches:
    """The launch seam: every process started, per service, newest last."""

    started: dict[str, list[FakeProcess]] = field(default_factory=dict)

    def __call__(self, name: str, env: Mapping[str, str], log: IO[bytes]) -> ChildProcess:
        process = FakeProcess(name)
        log.write(f"{name} started as pid {process.pid}\n".encode())
        self.started.setdefault(name, []).append(process)
        return process

    def current(self, name: str) -> FakeProcess:
        return self.started[name][-1]


@dataclass
class Rig:
    supervisor: Supervisor
    clock: FakeClock
    launches: Launches
    out: io.StringIO
    err: io.StringIO
    ready: dict[str, bool]
    client: httpx.Client
    state_dir: Path

    def tick(self) -> None:
        self.supervisor.watch_once(self.client)

    def crash(self, name: str, code: int = -signal.SIGKILL) -> None:
        self.launches.current(name).returncode = code


RigFactory = Callable[[RestartPolicy], Rig]


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[RigFactory]:
    """A supervisor whose five services were started (as fakes), under `policy`."""
    with contextlib.ExitStack() as stack:

        def make(policy: RestartPolicy) -> Rig:
            clock, launches = FakeClock(), Launches()
            out, err = io.StringIO(), io.StringIO()
            ready = dict.fromkeys(SERVICES, True)
            options = UpOptions(port_base=18_000, state_dir=tmp_path, restarts=policy)
            supervisor = Supervisor(options, out, err, clock=clock, launch=launches)
            (tmp_path / "logs").mkdir()
            for name in SERVICES:  # the logs are appended across runs
                (tmp_path / "logs" / f"{name}.log").write_text("an earlier run's line\n")
            by_port = {port: name for name, port in supervisor.ports.items()}

            def readyz(request: httpx.Request) -> httpx.Response:
                return httpx.Response(200 if ready[by_port[request.url.port or 80]] else 503)

            client = stack.enter_context(httpx.Client(transport=httpx.MockTransport(readyz)))
            for name in SERVICES:
                supervisor.spawn(name)
            return Rig(supervisor, clock, launches, out, err, ready, client, tmp_path)

        yield make


@pytest.fixture
def rig(make_rig: RigFactory) -> Rig:
    return make_rig(RestartPolicy())


def test_a_crash_is_restarted_after_its_backoff_while_the_others_keep_running(
    rig: Rig,
) -> None:
    first = rig.launches.current("features")
    rig.crash("features")
    rig.tick()
    assert "features was killed by SIGKILL; restarting it in 0.5 s" in rig.err.getvalue()
    assert len(rig.launches.started["features"]) == 1

    rig.clock.advance(0.4)
    rig.tick()
    assert len(rig.launches.started["features"]) == 1  # still backing off

    rig.ready["features"] = False  # started, still loading
    rig.clock.advance(0.1)
    rig.tick()
    second = rig.launches.current("features")
    assert second is not first
    assert f"features restarted (pid {second.pid})" in rig.out.getvalue()
    info = read_run_file(rig.state_dir)
    assert info is not None
    assert info.children["features"] == second.pid
    assert info.restarts == {**dict.fromkeys(SERVICES, 0), "features": 1}

    rig.tick()
    assert "ready again" not in rig.out.getvalue()
    rig.ready["features"] = True
    rig.tick()
    assert "features is ready again" in rig.out.getvalue()

    # Nobody else was stopped, signalled or started again.
    for name in SERVICES:
        if name != "features":
            assert len(rig.launches.started[name]) == 1
            assert rig.launches.current(name).signals == []
            assert rig.launches.current(name).poll() is None


def test_the_backoff_doubles_with_each_recent_crash(rig: Rig) -> None:
    for delay in (0.5, 1.0, 2.0, 4.0):
        rig.crash("inference")
        rig.tick()
        assert f"inference was killed by SIGKILL; restarting it in {delay:g} s" in (
            rig.err.getvalue()
        )
        rig.clock.advance(delay)
        rig.tick()
    assert len(rig.launches.started["inference"]) == 5
    info = read_run_file(rig.state_dir)
    assert info is not None
    assert info.restarts["inference"] == 4


def test_repeated_crashes_within_the_window_give_up_with_the_log_tail(
    make_rig: RigFactory,
) -> None:
    rig = make_rig(RestartPolicy(max_crashes=3, window=60.0))
    for _ in range(2):
        rig.crash("auth", code=1)
        rig.tick()
        rig.clock.advance(10.0)
        rig.tick()
    rig.crash("auth", code=1)
    with pytest.raises(ChildFailed) as failed:
        rig.tick()
    rig.supervisor.report_failure(failed.value.child, failed.value.starting)
    report = rig.err.getvalue()
    assert "auth exited with code 1 while running (3 crashes within 60 s): giving up" in report
    # The tail is this run's, every process's, up to the last one.
    tail = report.split("giving up", 1)[1].splitlines()
    pids = [process.pid for process in rig.launches.started["auth"]]
    assert [line for line in tail if line.startswith("auth started")] == [
        f"auth started as pid {pid}" for pid in pids
    ]
    assert "an earlier run's line" not in report


def test_crashes_further_apart_than_the_window_are_restarted_forever(
    make_rig: RigFactory,
) -> None:
    rig = make_rig(RestartPolicy(max_crashes=2, window=60.0))
    for _ in range(10):
        rig.crash("gateway")
        rig.tick()
        assert rig.err.getvalue().rstrip().endswith("(1 crash within 60 s; 2 stop everything)")
        rig.clock.advance(61.0)
        rig.tick()
    assert len(rig.launches.started["gateway"]) == 11


def test_a_refused_configuration_on_restart_gives_up_at_once(rig: Rig) -> None:
    rig.crash("analytics")
    rig.tick()
    rig.clock.advance(0.5)
    rig.tick()
    rig.crash("analytics", code=2)
    with pytest.raises(ChildFailed):
        rig.tick()


def test_a_signal_during_the_backoff_stops_before_any_restart(rig: Rig) -> None:
    rig.crash("features")
    rig.tick()
    rig.supervisor.signals.append(signal.SIGINT)
    rig.clock.advance(5.0)
    with pytest.raises(StopRequested):
        rig.tick()
    assert len(rig.launches.started["features"]) == 1


def test_stop_all_kills_what_ignores_sigterm_after_the_grace(rig: Rig) -> None:
    stubborn = rig.launches.current("inference")
    stubborn.ignores_sigterm = True
    started = rig.clock.now
    rig.supervisor.stop_all()
    assert rig.clock.now - started >= STOP_GRACE_S
    assert stubborn.signals == [signal.SIGTERM, signal.SIGKILL]
    assert "inference ignored SIGTERM" in rig.err.getvalue()
    for name in SERVICES:
        if name != "inference":
            assert rig.launches.current(name).signals == [signal.SIGTERM]


def _observer(rig: Rig) -> FakeProcess:
    """An --observe Prometheus beside the fake services."""
    process = FakeProcess("prometheus")
    log_path = rig.state_dir / "logs" / "prometheus.log"
    rig.supervisor.observer = Observer("http://127.0.0.1:18005", log_path, process)
    return process


def test_a_dead_prometheus_is_reported_once_and_the_services_keep_running(rig: Rig) -> None:
    prometheus = _observer(rig)
    prometheus.returncode = -signal.SIGKILL
    for _ in range(3):
        rig.tick()
    assert rig.err.getvalue().count("prometheus was killed by SIGKILL") == 1
    assert "the services keep running" in rig.err.getvalue()
    assert all(len(rig.launches.started[name]) == 1 for name in SERVICES)
    assert all(rig.launches.current(name).poll() is None for name in SERVICES)


def test_stop_all_stops_prometheus_with_the_services_and_the_run_file_names_it(rig: Rig) -> None:
    prometheus = _observer(rig)
    assert rig.supervisor.run_info().children["prometheus"] == prometheus.pid
    rig.supervisor.stop_all()
    assert prometheus.signals == [signal.SIGTERM]
    assert all(rig.launches.current(name).signals == [signal.SIGTERM] for name in SERVICES)


def test_without_redis_url_or_redis_server_up_says_analytics_is_off_and_how_to_turn_it_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server on it
    out, err = io.StringIO(), io.StringIO()
    supervisor = Supervisor(UpOptions(state_dir=tmp_path), out, err)

    assert supervisor.start_redis() is None
    assert "usage analytics is off" in err.getvalue()
    assert "apt-get install redis-server" in err.getvalue()
    assert "REDIS_URL=" in err.getvalue()


def test_a_redis_url_given_is_the_stacks_and_nothing_is_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://10.0.0.5:6379/2")
    supervisor = Supervisor(UpOptions(state_dir=tmp_path), io.StringIO(), io.StringIO())

    assert supervisor.start_redis() == "redis://10.0.0.5:6379/2"
    assert supervisor.local_redis is None
