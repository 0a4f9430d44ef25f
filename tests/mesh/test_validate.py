"""`narthex mesh validate`: every overlay passes; each broken variant fails with the right
code and a message naming the file and the object; Istio's own CRD fixtures behave."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from narthex.cli.main import app
from narthex.cli.mesh_render import render
from narthex.cli.mesh_validate import Validator, report
from tests.mesh.conftest import MESH

FIXTURES = Path(__file__).parent / "fixtures"
BROKEN = sorted((FIXTURES / "broken").glob("*.yaml"))
ISTIO = FIXTURES / "istio-crd-testdata"
OVERLAYS = sorted(p.name for p in (MESH / "overlays").iterdir())


def validate(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["mesh", "validate", *args])
    return result.exit_code, result.stdout


def test_there_are_dev_prod_and_gpu_overlays() -> None:
    assert {"dev", "prod", "gpu"} <= set(OVERLAYS)


def test_every_overlay_validates() -> None:
    code, out = validate("--mesh-dir", str(MESH), "--format", "json")
    report = json.loads(out)
    assert report["findings"] == []
    assert report["overlays"] == {name: {"ok": True, "count": 0} for name in OVERLAYS}
    assert report["ok"] is True
    assert code == 0


def _break(mesh_dir: Path, case: dict[str, Any]) -> None:
    for edit in case["edits"]:
        path = mesh_dir / edit["file"]
        text = path.read_text()
        assert edit["replace"] in text, f"fixture out of date: {edit['replace']!r} not in {path}"
        path.write_text(text.replace(edit["replace"], edit["with"], 1))


@pytest.mark.parametrize("fixture", BROKEN, ids=lambda p: p.stem)
def test_a_broken_variant_fails_naming_code_file_and_object(
    fixture: Path, mesh_dir: Path, validator: Validator
) -> None:
    case = yaml.safe_load(fixture.read_text())
    _break(mesh_dir, case)
    expect = case["expect"]

    findings = validator.run(mesh_dir / "overlays" / "prod")
    out = io.StringIO()
    assert report({"prod": findings}, out, as_json=True) == 1
    document = json.loads(out.getvalue())
    assert document["ok"] is False
    matching = [f for f in document["findings"] if f["code"] == expect["code"]]
    assert matching, f"no {expect['code']} in {document['findings']}"
    found = [
        f
        for f in matching
        if f["file"] == expect["file"]
        and f["object"] == expect["object"]
        and expect["message"] in f["message"]
    ]
    assert found, f"expected {expect}, got {matching}"
    assert all(f["level"] == "error" and f["overlay"] == "prod" for f in found)

    # The text report says the same on one line, for a person reading CI's log.
    text = io.StringIO()
    assert report({"prod": findings}, text) == 1
    where = f"[prod] {expect['file']}: {expect['object']}: " if expect["file"] else "prod"
    assert any(
        line.startswith(f"ERROR {expect['code']} ") and where in line and expect["message"] in line
        for line in text.getvalue().splitlines()
    ), text.getvalue()


def test_the_command_exits_1_and_names_the_problem(mesh_dir: Path) -> None:
    _break(mesh_dir, yaml.safe_load((FIXTURES / "broken" / "subset-missing.yaml").read_text()))
    code, out = validate("--mesh-dir", str(mesh_dir), "--overlay", "dev")
    assert code == 1
    assert (
        "ERROR IST0101 (ReferencedResourceNotFound) [dev]"
        " base/app/istio/inference-virtualservice.yaml: VirtualService narthex/inference:"
        " Referenced host+subset in destinationrule not found:"
        ' "inference.narthex.svc.cluster.local+v3"'
    ) in out
    assert out.rstrip().endswith("dev: 1 error(s)")


def test_every_check_has_a_broken_variant() -> None:
    codes = {yaml.safe_load(p.read_text())["expect"]["code"] for p in BROKEN}
    assert codes >= {
        "IST0101", "IST0106", "IST0118", "IST0127", "NX0001", "NX0003", "NX0004", "NX0005",
        "NX0006", "NX0007", "NX0008", "NX0009",
    }  # fmt: skip


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


VALID = [
    pytest.param(doc, id=f"{path.stem}:{doc['metadata']['name']}:{i}")
    for path in sorted(ISTIO.glob("*-valid.yaml"))
    for i, doc in enumerate(_documents(path))
]
INVALID = [
    pytest.param(doc, id=f"{path.stem}:{doc['metadata']['name']}:{i}")
    for path in sorted(ISTIO.glob("*-invalid.yaml"))
    for i, doc in enumerate(_documents(path))
]


@pytest.mark.parametrize("doc", VALID)
def test_istio_valid_examples_pass(doc: dict[str, Any], validator: Validator) -> None:
    assert validator.schemas.errors(doc) == []


@pytest.mark.parametrize("doc", INVALID)
def test_istio_invalid_examples_fail_with_istios_error(
    doc: dict[str, Any], validator: Validator
) -> None:
    expected = doc.pop("_err")
    messages = [error.message for error in validator.schemas.errors(doc)]
    assert any(expected in message for message in messages), (expected, messages)


def test_the_istio_fixtures_are_all_there() -> None:
    assert len(VALID) >= 7
    assert len(INVALID) >= 11


def test_findings_name_the_file_each_object_came_from() -> None:
    files = {(obj.kind, obj.name): obj.file for obj in render(MESH / "overlays" / "gpu", MESH)}
    assert files[("Deployment", "inference-v2")] == "base/app/inference.yaml"
    assert files[("HorizontalPodAutoscaler", "gateway")] == "overlays/prod/hpa.yaml"
    assert files[("PeerAuthentication", "default")] == "base/mesh-wide/peerauthentication.yaml"
