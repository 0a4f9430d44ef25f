"""`narthex mesh validate`: render every overlay, check every object against its schema,
then cross-check the whole; offline, with the schemas vendored under mesh/schemas/."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from narthex.cli.mesh_analyze import analyze
from narthex.cli.mesh_findings import Catalogue, Finding
from narthex.cli.mesh_render import Obj, RenderError, render

if TYPE_CHECKING:
    from narthex.cli.mesh_schemas import SchemaSet

__all__ = ["KUBERNETES_VERSION", "Validator", "overlays", "report"]

# The oldest Kubernetes the manifests promise to work on (matchLabelKeys in affinity terms).
KUBERNETES_VERSION = "1.33"
CRDS = "schemas/istio-crd-all.gen.yaml"
MESSAGES = "schemas/istio-analyzer-messages.yaml"


def overlays(mesh_dir: Path, names: Sequence[str] = ()) -> list[Path]:
    """The overlays to check: those named, else every directory under overlays/."""
    root = mesh_dir / "overlays"
    if names:
        return [root / name for name in names]
    return sorted(p for p in root.iterdir() if (p / "kustomization.yaml").is_file())


@dataclass
class Validator:
    """Schemas and messages loaded once; `run` checks one overlay."""

    mesh_dir: Path
    kubernetes_version: str = KUBERNETES_VERSION

    def __post_init__(self) -> None:
        # Imported on use: jsonschema, CEL and the Kubernetes schemas cost a third of a
        # second that `narthex --help` need not pay.
        from narthex.cli.mesh_schemas import SchemaSet

        self.schemas: SchemaSet = SchemaSet(self.mesh_dir / CRDS)
        self.catalogue = Catalogue(self.mesh_dir / MESSAGES)

    def run(self, overlay: Path) -> list[Finding]:
        """Check `overlay` (any mesh tree's: mesh/overlays/<name>; files are named relative
        to that tree)."""
        try:
            objects = render(overlay, overlay.parent.parent)
        except RenderError as exc:
            return [
                self.catalogue.finding("KustomizeBuildFailed", None, str(exc), overlay=overlay.name)
            ]
        return self.check(objects)

    def check(self, objects: Sequence[Obj]) -> list[Finding]:
        findings = [f for obj in objects for f in self.schema_findings(obj)]
        return findings + analyze(objects, self.catalogue)

    def schema_findings(self, obj: Obj) -> list[Finding]:
        from narthex.cli.mesh_schemas import kubernetes_errors

        if self.schemas.knows(obj.api_version, obj.kind):
            errors = self.schemas.errors(obj.body)
        else:
            found = kubernetes_errors(obj.body, self.kubernetes_version)
            if found is None:
                return [self.catalogue.finding("UnknownKind", obj, obj.api_version, obj.kind)]
            errors = found
        return [
            self.catalogue.finding("SchemaValidationError", obj, error.message) for error in errors
        ]


def report(
    findings_by_overlay: dict[str, list[Finding]], out: TextIO, *, as_json: bool = False
) -> int:
    """Print the findings; the exit status is 1 when any is an error."""
    everything = [f for findings in findings_by_overlay.values() for f in findings]
    errors = sum(f.level == "error" for f in everything)
    if as_json:
        json.dump(
            {
                "ok": errors == 0,
                "overlays": {
                    name: {"ok": not any(f.level == "error" for f in found), "count": len(found)}
                    for name, found in findings_by_overlay.items()
                },
                "findings": [f.as_dict() for f in everything],
            },
            out,
            indent=2,
        )
        out.write("\n")
    else:
        for finding in everything:
            out.write(finding.line() + "\n")
        for name, found in findings_by_overlay.items():
            bad = sum(f.level == "error" for f in found)
            out.write(f"{name}: {'ok' if not bad else f'{bad} error(s)'}\n")
    return 1 if errors else 0
