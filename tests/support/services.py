"""Run narthex services as real processes on free loopback ports, for end-to-end tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Service:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_lines(self) -> list[dict[str, object]]:
        """Every JSON line the service wrote so far (non-JSON lines fail the test)."""
        text = self.log_path.read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]


@contextmanager
def run_service(
    name: str, tmp_path: Path, env: Mapping[str, str] | None = None, timeout: float = 30.0
) -> Iterator[Service]:
    """Start `python -m narthex.<name>`, wait for /readyz, stop it on exit."""
    port = free_port()
    prefix = f"NARTHEX_{name.upper()}_"
    log_path = tmp_path / f"{name}.log"
    child_env = {
        **os.environ,
        f"{prefix}HOST": "127.0.0.1",
        f"{prefix}PORT": str(port),
        # Services default to production; tests run them as `narthex up` does.
        f"{prefix}ENV": "dev",
        **(env or {}),
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", f"narthex.{name}"],
            env=child_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    service = Service(name, f"http://127.0.0.1:{port}", process, log_path)
    try:
        wait_ready(service, timeout)
        yield service
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_ready(service: Service, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(
                f"{service.name} exited with {service.process.returncode}:\n"
                + service.log_path.read_text()[-2000:]
            )
        try:
            if httpx.get(service.url + "/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{service.name} not ready after {timeout}s")
