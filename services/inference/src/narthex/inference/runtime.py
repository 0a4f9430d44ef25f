"""ONNX Runtime sessions: the execution provider in use, the graph's tensors, one `run()`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from narthex.inference.datatypes import onnx_datatype

__all__ = ["PREFERENCE", "GraphTensor", "Session", "choose_providers", "intra_op_threads"]

# Fastest first; whichever the installed onnxruntime offers is used.
PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_BY_CHOICE = {
    "tensorrt": PREFERENCE,
    "cuda": PREFERENCE[1:],
    "cpu": PREFERENCE[2:],
    "auto": PREFERENCE,
}


def choose_providers(choice: str, available: Sequence[str] | None = None) -> list[str]:
    """The providers to ask for, in order. Asking is not getting: onnxruntime-gpu lists
    CUDA and TensorRT even without a GPU and falls back silently, so what a session really
    uses is read back from it (`Session.provider`)."""
    offered = set(ort.get_available_providers() if available is None else available)
    wanted = [p for p in _BY_CHOICE[choice] if p in offered]
    if not wanted:
        raise RuntimeError(f"no execution provider for {choice!r} among {sorted(offered)}")
    return wanted


def intra_op_threads(setting: int, instances: int, cpus: int | None = None) -> int:
    """Threads of one session run, for a version of `instances` runners sharing the session.
    A setting above 0 wins. Auto (0) with one instance leaves it to ONNX Runtime (one per
    core); with several, the cores are split between them: N runs at once with a thread per
    core each would oversubscribe the CPU N times."""
    if setting > 0:
        return setting
    if instances == 1:
        return 0
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) // instances)


@dataclass(frozen=True, slots=True)
class GraphTensor:
    name: str
    datatype: str  # OIP datatype
    shape: tuple[int | str | None, ...]  # symbolic or None where the graph leaves it open


class Session:
    """One model file in ONNX Runtime. `run` blocks: callers run it off the event loop."""

    def __init__(self, path: Path, *, provider: str = "auto", intra_op_threads: int = 0) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads
        self.intra_op_threads = intra_op_threads  # 0: ONNX Runtime's choice
        # A run is one batch; parallelism between batches is the version's instances'.
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        # ONNX Runtime's pool threads spin between runs by default, holding cores that the
        # event loop (and the next request) needs; a serving process wants them asleep.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(
            str(path), sess_options=options, providers=choose_providers(provider)
        )
        self.providers: list[str] = list(self._session.get_providers())
        self.provider = self.providers[0]
        self.inputs = {
            i.name: GraphTensor(i.name, onnx_datatype(i.type), tuple(i.shape))
            for i in self._session.get_inputs()
        }
        self.outputs = {
            o.name: GraphTensor(o.name, onnx_datatype(o.type), tuple(o.shape))
            for o in self._session.get_outputs()
        }
        self._output_names = list(self.outputs)

    def run(self, feeds: Mapping[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        values = self._session.run(self._output_names, dict(feeds))
        return dict(zip(self._output_names, values, strict=True))
