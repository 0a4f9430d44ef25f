"""`narthex up` as a real process for tests: free consecutive ports, a clean environment, its
output collected, and everything it started killed whatever the test did."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from narthex.testing.processes import free_port_base, port_free
from tests.support.models import builtin_repository

__all__ = [
    "READY_TIMEOUT_S",
    "STOP_TIMEOUT_S",
    "SUMMARY_END",
    "Up",
    "free_port_base",
    "narthex_argv",
    "narthex_env",
    "pid_running",
    "port_free",
    "read_run_file",
    "running_up",
]

# Five Python services importing FastAPI at once take ~7 s on a quiet 2-CPU box and over
# 60 s on a loaded one; the limit only bounds a hang.
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
SUMMARY_END = "Ctrl-C to stop"


def pid_running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def narthex_env(**extra: str) -> dict[str, str]:
    # The developer's own NARTHEX_* settings must not leak into what is under test.
    env = {k: v for k, v in os.environ.items() if not k.startswith("NARTHEX_")}
    # The built-in models, built once for the whole test run, not once per state dir.
    env["NARTHEX_INFERENCE_MODEL_REPOSITORY"] = str(builtin_repository())
    env.update(extra)
    return env


def narthex_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "narthex.cli.main", *args]


def read_run_file(state_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((state_dir / "up.json").read_text())
    return data


class Up:
    """One `narthex up` process; its stdout and stderr collected by a reader thread."""

    def __init__(
        self,
        state_dir: Path,
        port_base: int,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.state_dir = state_dir
        self.port_base = port_base
        self.ports = [port_base + offset for offset in range(5)]
        self.child_pids: list[int] = []
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            narthex_argv(
                "up",
                "--host",
                "127.0.0.1",
                "--port-base",
                str(port_base),
                "--state-dir",
                str(state_dir),
                "--timeout",
                str(READY_TIMEOUT_S),
                *args,
            ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env or narthex_env(),
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        # A closed pipe ends the loop; nothing may escape a thread under filterwarnings=error.
        with contextlib.suppress(OSError, ValueError):
            for line in self.proc.stdout:
                with self._lock:
                    self._lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        with self._lock:
            return "\n".join(self._lines)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if self.proc.poll() is not None:
                self._reader.join(timeout=5)
                if text in self.output:
                    return
                pytest.fail(f"narthex up exited {self.proc.returncode}:\n{self.output}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {text!r} within {timeout} s:\n{self.output}")
            time.sleep(0.1)

    def remember_children(self, at_least: int = 5, timeout: float = 10.0) -> None:
        """Child pids from the run file, once it names `at_least` of them."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, ValueError):
                self.child_pids = list(read_run_file(self.state_dir)["children"].values())
            if len(self.child_pids) >= at_least:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"run file names {self.child_pids} after {timeout} s")
            time.sleep(0.02)

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"narthex up still running after {timeout} s:\n{self.output}")
        self._reader.join(timeout=5)
        return code

    def close(self) -> None:
        """Whatever happened: the supervisor and every child it started are gone."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        with contextlib.suppress(OSError, ValueError, KeyError):
            self.child_pids.extend(read_run_file(self.state_dir)["children"].values())
        for pid in set(self.child_pids):
            if pid_running(pid) and _ours(Path(f"/proc/{pid}/cmdline").read_bytes()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _ours(cmdline: bytes) -> bool:
    """A service `up` starts, or its --observe Prometheus (a pid may have been reused)."""
    return b"narthex." in cmdline or cmdline.split(b"\0", 1)[0].endswith(b"prometheus")


@contextlib.contextmanager
def running_up(
    state_dir: Path,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
    port_count: int = 6,
) -> Iterator[Up]:
    up = Up(state_dir, free_port_base(port_count), env, args)
    try:
        yield up
    finally:
        up.close()
