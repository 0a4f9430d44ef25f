"""Private pinned venvs under `.tools/`: made once, reused while their marker matches.

What must stay out of the workspace's lock (torch for the minilm export, the benchmark
peers) gets a venv of its own. What `first` names is installed alone and first, then pinned
for everything after it: `pip install torch==2.13.0` takes the local CPU build on these
machines, and with the rest constrained to it, nothing later can make pip resolve a fresh
(CUDA, gigabytes) torch. The marker is written last, so a venv cut short has none and is
made again, as is one whose marker records other requirements or another Python.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MARKER", "PinnedVenv", "VenvError", "ensure", "run_logged"]

MARKER = "narthex-venv.json"


class VenvError(RuntimeError):
    """A venv could not be made; the message ends with the install log's tail."""


@dataclass(frozen=True)
class PinnedVenv:
    path: Path
    requirements: tuple[str, ...]
    first: tuple[str, ...] = ()  # `name==version` pins, installed alone before the rest

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def marker(self) -> Path:
        return self.path / MARKER

    def wanted(self) -> dict[str, Any]:
        """What the venv is made from: a marker recording anything else is stale."""
        return {
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "first": list(self.first),
            "requirements": list(self.requirements),
        }

    def fresh(self) -> bool:
        try:
            marker = json.loads(self.marker.read_text("utf-8"))
        except (OSError, ValueError):
            return False
        return (
            isinstance(marker, dict)
            and marker.get("spec") == self.wanted()
            and self.python.is_file()
        )


def ensure(venv: PinnedVenv, *, say: Callable[[str], None]) -> Path:
    """The venv's python; the venv is made first when absent, cut short or stale. `say`
    tells the person waiting what is being installed."""
    with _locked(venv.path.with_name(f".{venv.path.name}.lock")):
        if venv.fresh():
            return venv.python
        started = time.perf_counter()
        if venv.path.exists():
            say(f"{venv.path} is stale or incomplete; making it again")
            shutil.rmtree(venv.path)
        say(f"making {venv.path} (once; minutes when it holds torch)")
        subprocess.run([sys.executable, "-m", "venv", str(venv.path)], check=True)
        log = venv.path / "install.log"
        pip: list[str | Path] = [
            venv.python,
            *("-m", "pip", "install", "--no-input", "--disable-pip-version-check"),
        ]
        constraints: list[str | Path] = []
        if venv.first:
            say(f"pip install {' '.join(venv.first)}")
            run_logged([*pip, *venv.first], log, f"pip install {' '.join(venv.first)}")
            pins = venv.path / "constraints.txt"
            pins.write_text("\n".join(venv.first) + "\n", encoding="utf-8")
            constraints = ["-c", pins]
        say(f"pip install {' '.join(venv.requirements)}")
        run_logged([*pip, *constraints, *venv.requirements], log, "pip install")
        installed = subprocess.run(
            [venv.python, "-m", "pip", "freeze", "--disable-pip-version-check"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        for pin in venv.first:
            name, _, version = pin.partition("==")
            # A local build's version carries a suffix (torch==2.13.0+cpu): still the pin.
            if not any(line.startswith(f"{name}=={version}") for line in installed):
                raise VenvError(f"venv {venv.path}: {name} is not {version}: {installed}")
        seconds = round(time.perf_counter() - started, 1)
        marker = {"spec": venv.wanted(), "installed": installed, "seconds": seconds}
        venv.marker.write_text(json.dumps(marker, indent=2), encoding="utf-8")
        say(f"{venv.path} ready in {seconds} s")
        return venv.python


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # Two builds at once (a test and `narthex models build`, two bench runs) must not both
    # make one venv.
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_logged(command: Sequence[str | Path], log: Path, what: str, **kwargs: Any) -> None:
    """Run quietly into `log`; on failure, raise VenvError with the log's tail, which says
    why."""
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(map(str, command))}\n".encode())
        out.flush()
        result = subprocess.run(
            command, stdout=out, stderr=subprocess.STDOUT, check=False, **kwargs
        )
    if result.returncode != 0:
        lines = log.read_text("utf-8", errors="replace").splitlines()
        # pip's complaints about unreadable index folders are noise, not the cause.
        tail = "\n".join([ln for ln in lines if "is ignored: it is neither" not in ln][-40:])
        raise VenvError(f"{what} failed (exit {result.returncode}); log {log}:\n{tail}")
