"""The redis-server `narthex up` starts when no REDIS_URL is given: private port, data in the
state directory, append-only, so that usage events survive a restart of the stack."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["ANALYTICS_OFF", "LocalRedis", "redis_binary"]

HOST = "127.0.0.1"  # private to this machine whatever --host the services bind
READY_TIMEOUT_S = 10.0
ANALYTICS_OFF = (
    "narthex: usage analytics is off: REDIS_URL is not set and no redis-server is installed"
    " (events need Redis Streams). Turn it on with `apt-get install redis-server` (narthex up"
    " then starts a private one under the state directory) or by setting"
    " REDIS_URL=redis://host:port/0."
)


def redis_binary() -> str | None:
    return shutil.which("redis-server")


def _pong(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class LocalRedis:
    """One redis-server child: `start()` waits for PING, `stop()` is SIGTERM (the
    append-only file is complete) and then SIGKILL after a grace period."""

    def __init__(self, binary: str, port: int, state_dir: Path) -> None:
        self.binary = binary
        self.port = port
        self.directory = state_dir.resolve() / "redis"
        self.url = f"redis://{HOST}:{port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        return [
            self.binary,
            "--bind", HOST,
            "--port", str(self.port),
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
        ]  # fmt: skip

    def start(self, log: IO[bytes], preexec: Callable[[], None] | None = None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            process_group=0,  # Ctrl-C reaches the supervisor, which stops it last
            preexec_fn=preexec,
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            if _pong(self.port):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on {HOST}:{self.port}")

    def stop(self, grace: float = 10.0) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()
