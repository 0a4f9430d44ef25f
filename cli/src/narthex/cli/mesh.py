"""`narthex mesh`: the platform team's commands over mesh/ (typer; the work is in mesh_*)."""

from __future__ import annotations

import difflib
import io
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from narthex.cli.mesh_plan import (
    CanaryPlan,
    EditError,
    Plans,
    apply_weights,
    parse_assignments,
    read_weights,
    unified_diff,
    write_atomically,
)
from narthex.cli.mesh_render import KubectlMissing, Obj, RenderError, render
from narthex.cli.mesh_validate import KUBERNETES_VERSION, Validator, overlays, report

__all__ = ["mesh_app"]

mesh_app = typer.Typer(
    help="Kubernetes + Istio config (mesh/): canary weights, offline validation.",
    no_args_is_help=True,
)

MeshDir = Annotated[
    Path,
    typer.Option(
        "--mesh-dir", help="The kustomize tree (base/, overlays/, canary.yaml).", file_okay=False
    ),
]
Service = Annotated[str, typer.Argument(help="The canary plan (mesh/canary.yaml), by service.")]
DryRun = Annotated[
    bool, typer.Option("--dry-run", help="Print the change as a diff; write nothing.")
]
DEFAULT_MESH = Path("mesh")


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"narthex mesh: {message}", err=True)
    return typer.Exit(code)


def _plan(mesh_dir: Path, service: str) -> tuple[Plans, CanaryPlan]:
    try:
        plans = Plans.load(mesh_dir)
        return plans, plans.plan(service)
    except (EditError, OSError) as exc:
        raise _fail(str(exc)) from None


def _current(plan: CanaryPlan) -> dict[str, int]:
    """The weights every split route agrees on (refused when they disagree)."""
    routes = read_weights(plan)
    distinct = {tuple(sorted(w.items())) for w in routes.values()}
    if len(distinct) != 1:
        shown = "; ".join(f"{name}: {_show(w)}" for name, w in routes.items())
        raise EditError(
            f"the split routes disagree ({shown}): set both with"
            f" `narthex mesh set {plan.service} {plan.canary}=N`"
        )
    return next(iter(routes.values()))


def _show(weights: Mapping[str, int]) -> str:
    return " ".join(f"{subset}={weight}" for subset, weight in weights.items())


def _edit(mesh_dir: Path, plan: CanaryPlan, weights: Mapping[str, int], dry_run: bool) -> None:
    before, after = apply_weights(plan, weights)
    if dry_run:
        typer.echo(unified_diff(plan.file, before, after, mesh_dir.resolve()), nl=False)
        return
    if after != before:
        write_atomically(plan.file, after)
    typer.echo(f"{plan.service}: {_show(weights)} ({plan.file.relative_to(mesh_dir.resolve())})")


@mesh_app.command("set")
def set_weights(
    service: Service,
    weights: Annotated[
        list[str], typer.Argument(help="SUBSET=WEIGHT: `v2=10` (v1 gets the rest) or both.")
    ],
    mesh_dir: MeshDir = DEFAULT_MESH,
    dry_run: DryRun = False,
) -> None:
    """Set the canary's weights on every split route; they must sum to 100."""
    _, plan = _plan(mesh_dir, service)
    try:
        _edit(mesh_dir, plan, parse_assignments(plan, weights), dry_run)
    except EditError as exc:
        raise _fail(f"refused: {exc}") from None


@mesh_app.command()
def promote(
    service: Service = "inference",
    prometheus: Annotated[
        str | None,
        typer.Option(
            "--prometheus",
            help="Prometheus base URL: compare the canary with the stable version first.",
        ),
    ] = None,
    mesh_dir: MeshDir = DEFAULT_MESH,
    dry_run: DryRun = False,
) -> None:
    """Move the canary to the next step of its plan (e.g. 10 -> 25 -> 50 -> 100)."""
    plans, plan = _plan(mesh_dir, service)
    try:
        current = _current(plan)
    except EditError as exc:
        raise _fail(f"refused: {exc}") from None
    now = current[plan.canary]
    upcoming = [step for step in plan.steps if step > now]
    if not upcoming:
        typer.echo(
            f"{service}: {plan.canary} already takes 100%; the promotion is complete"
            f" (roll {plan.stable} forward to the new release, then `narthex mesh rollback`)"
        )
        return
    step = upcoming[0]
    if prometheus is not None:
        from narthex.cli.mesh_gate import GateError, judge  # httpx: only when asked

        try:
            verdict = judge(prometheus, plan, plans.gate, now)
        except GateError as exc:
            raise _fail(f"refused: the gate could not measure: {exc}") from None
        typer.echo(f"gate ({plans.gate.window}): {verdict.summary()}")
        for note in verdict.notes:
            typer.echo(f"gate: {note}")
        if not verdict.passed:
            raise _fail(
                f"refused to promote {service} {plan.canary} from {now}% to {step}%: "
                + "; ".join(verdict.reasons)
            )
    try:
        _edit(mesh_dir, plan, {plan.stable: 100 - step, plan.canary: step}, dry_run)
    except EditError as exc:
        raise _fail(f"refused: {exc}") from None


@mesh_app.command()
def rollback(
    service: Service = "inference", mesh_dir: MeshDir = DEFAULT_MESH, dry_run: DryRun = False
) -> None:
    """Send every request back to the stable version (canary weight 0)."""
    _, plan = _plan(mesh_dir, service)
    try:
        _edit(mesh_dir, plan, {plan.stable: 100, plan.canary: 0}, dry_run)
    except EditError as exc:
        raise _fail(f"refused: {exc}") from None


@mesh_app.command()
def validate(
    mesh_dir: MeshDir = DEFAULT_MESH,
    overlay: Annotated[
        list[str] | None,
        typer.Option("--overlay", help="Check this overlay (repeatable; default: all)."),
    ] = None,
    output: Annotated[str, typer.Option("--format", help="text, or json for CI tools.")] = "text",
    kubernetes_version: Annotated[
        str, typer.Option(help="Kubernetes schemas to validate against.")
    ] = KUBERNETES_VERSION,
) -> None:
    """Render every overlay and check it offline: Kubernetes and Istio schemas, then
    cross-checks in the spirit of `istioctl analyze`. Exit 1 on any error."""
    if output not in ("text", "json"):
        raise typer.BadParameter("--format is text or json")
    try:
        validator = Validator(mesh_dir, kubernetes_version)
        targets = overlays(mesh_dir, overlay or ())
        findings = {target.name: validator.run(target) for target in targets}
    except (KubectlMissing, OSError) as exc:
        raise _fail(str(exc), 2) from None
    raise typer.Exit(report(findings, sys.stdout, as_json=output == "json"))


@mesh_app.command()
def status(
    mesh_dir: MeshDir = DEFAULT_MESH,
    overlay: Annotated[str, typer.Option(help="The overlay whose policies to show.")] = "prod",
) -> None:
    """The canary weights, subsets and policies as they stand in the files."""
    plans = Plans.load(mesh_dir)
    try:
        objects = render(mesh_dir / "overlays" / overlay, mesh_dir)
    except (RenderError, KubectlMissing) as exc:
        raise _fail(str(exc)) from None
    for plan in plans.canaries.values():
        _status_canary(mesh_dir, plan, objects)
    _status_policies(objects, overlay)


def _status_canary(mesh_dir: Path, plan: CanaryPlan, objects: Sequence[Obj]) -> None:
    routes = read_weights(plan)
    typer.echo(f"{plan.service}: VirtualService {plan.virtualservice}")
    typer.echo(f"  file     {plan.file.relative_to(mesh_dir.resolve())}")
    for name, weights in routes.items():
        typer.echo(f"  route    {name}: {_show(weights)}")
    canary = next(iter(routes.values()))[plan.canary]
    upcoming = [s for s in plan.steps if s > canary]
    steps = " -> ".join(map(str, plan.steps))
    typer.echo(f"  plan     {steps} (next: {upcoming[0] if upcoming else 'done'})")
    for obj in objects:
        if obj.kind == "VirtualService" and obj.name == plan.virtualservice:
            for route in obj.spec.get("http") or []:
                destinations = route.get("route") or []
                if len(destinations) == 1 and route.get("match"):
                    subset = destinations[0]["destination"].get("subset")
                    typer.echo(f"  pinned   {_match(route['match'])} -> {subset}")
        if obj.kind == "DestinationRule":
            for subset in obj.spec.get("subsets") or []:
                labels = ",".join(f"{k}={v}" for k, v in (subset.get("labels") or {}).items())
                typer.echo(f"  subset   {subset['name']} ({labels}) in DestinationRule {obj.name}")


def _match(matches: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for match in matches:
        for header, rule in (match.get("headers") or {}).items():
            parts.append(f"{header}: {next(iter(rule.values()))}")
    return ", ".join(parts) or "match"


def _status_policies(objects: Sequence[Obj], overlay: str) -> None:
    typer.echo(f"policies ({overlay} overlay):")
    for obj in objects:
        if obj.kind == "PeerAuthentication":
            scope = "mesh-wide" if obj.namespace == "istio-system" else f"in {obj.namespace}"
            mode = (obj.spec.get("mtls") or {}).get("mode", "UNSET")
            typer.echo(f"  mTLS     {mode} {scope} (PeerAuthentication {obj.name})")
    for obj in objects:
        if obj.kind == "DestinationRule":
            tls = ((obj.spec.get("trafficPolicy") or {}).get("tls") or {}).get("mode", "default")
            typer.echo(f"  rule     {obj.spec.get('host')}: TLS {tls}")
    for obj in objects:
        if obj.kind != "AuthorizationPolicy":
            continue
        selector = (obj.spec.get("selector") or {}).get("matchLabels") or {}
        target = ",".join(f"{k}={v}" for k, v in selector.items()) or f"all of {obj.namespace}"
        rules = obj.spec.get("rules") or []
        if not rules:
            typer.echo(f"  authz    {target}: deny all not allowed elsewhere ({obj.name})")
        for rule in rules:
            who = [
                p.removeprefix("cluster.local/")
                for source in rule.get("from") or []
                for p in (source.get("source") or {}).get("principals") or []
            ]
            what = []
            for op in (item.get("operation") or {} for item in rule.get("to") or []):
                methods = ",".join(op.get("methods") or [])
                paths = ",".join(op.get("paths") or [])
                not_paths = ",".join(op.get("notPaths") or [])
                what.append(
                    " ".join(
                        filter(None, [methods, paths, f"not {not_paths}" if not_paths else ""])
                    )
                )
            typer.echo(
                f"  authz    {target} <- {', '.join(who) or 'anyone'}: {'; '.join(what) or 'all'}"
            )


@mesh_app.command()
def diff(
    mesh_dir: MeshDir = DEFAULT_MESH,
    overlay: Annotated[str, typer.Option(help="The overlay to render on both sides.")] = "prod",
    against: Annotated[
        str, typer.Option(help="The git revision to compare the working tree with.")
    ] = "HEAD",
) -> None:
    """What `kubectl apply -k` would change: the overlay rendered from the working tree
    against the same overlay rendered from a git revision, object by object. Exit 1 when
    they differ (like diff), 0 when not."""
    try:
        ours = render(mesh_dir / "overlays" / overlay, mesh_dir)
        with tempfile.TemporaryDirectory(prefix="narthex-mesh-diff-") as tmp:
            theirs_dir = _checkout(mesh_dir, against, Path(tmp))
            theirs = render(theirs_dir / "overlays" / overlay, theirs_dir)
    except (RenderError, KubectlMissing, subprocess.CalledProcessError) as exc:
        detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        raise _fail(str(detail).strip().removeprefix("fatal: "), 2) from None
    text = "".join(
        difflib.unified_diff(
            _dump(theirs).splitlines(keepends=True),
            _dump(ours).splitlines(keepends=True),
            f"{against}:{overlay}",
            f"working tree:{overlay}",
        )
    )
    typer.echo(text, nl=False)
    raise typer.Exit(1 if text else 0)


def _checkout(mesh_dir: Path, revision: str, into: Path) -> Path:
    """mesh/ as it was at `revision`, extracted under `into` (git archive: no checkout)."""
    mesh = mesh_dir.resolve()
    top = Path(
        subprocess.run(
            ["git", "-C", str(mesh), "rev-parse", "--show-toplevel"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    relative = mesh.relative_to(top)
    archive = subprocess.run(
        ["git", "-C", str(top), "archive", "--format=tar", revision, "--", str(relative)],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / relative


def _dump(objects: Sequence[Obj]) -> str:
    ordered = sorted(objects, key=lambda o: (o.kind, o.namespace, o.name))
    return "".join(
        f"# {obj.ref} ({obj.file})\n" + yaml.safe_dump(dict(obj.body), sort_keys=True) + "---\n"
        for obj in ordered
    )
