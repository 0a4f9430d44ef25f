"""The run file (`<state-dir>/up.json`) and lock of a `narthex up`: who runs, where, since when."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from narthex.cli.stack import service_url

RUN_FILE = "up.json"
LOCK_FILE = "up.lock"


@dataclass(frozen=True)
class RunInfo:
    """What `<state-dir>/up.json` says about a supervisor."""

    pid: int
    host: str
    ports: dict[str, int]
    started_at: str
    children: dict[str, int] = field(default_factory=dict)
    log_dir: str = ""
    restarts: dict[str, int] = field(default_factory=dict)  # per service, since `up` began

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
            "restarts": self.restarts,
        }

    @classmethod
    def from_json(cls, data: Any) -> RunInfo:
        if not isinstance(data, dict):
            raise ValueError("run file is not a JSON object")
        ports = {str(k): int(v) for k, v in dict(data["ports"]).items()}
        children = {str(k): int(v) for k, v in dict(data.get("children") or {}).items()}
        restarts = {str(k): int(v) for k, v in dict(data.get("restarts") or {}).items()}
        return cls(
            pid=int(data["pid"]),
            host=str(data["host"]),
            ports=ports,
            started_at=str(data["started_at"]),
            children=children,
            log_dir=str(data.get("log_dir") or ""),
            restarts=restarts,
        )


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
