"""Findings of `narthex mesh validate`: Istio's analyzer codes and wording where Istio has a
message for the problem (the vendored istio-analyzer-messages.yaml), narthex's own (NX)
where it has none."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from narthex.cli.mesh_render import Obj

__all__ = ["NARTHEX_MESSAGES", "Catalogue", "Finding"]


@dataclass(frozen=True)
class Message:
    code: str
    name: str
    level: str
    template: str


# narthex's own checks; the template is Go's fmt notation, like Istio's.
NARTHEX_MESSAGES = {
    "KustomizeBuildFailed": Message(
        "NX0001", "KustomizeBuildFailed", "Error", "kustomize could not render the overlay: %s"
    ),
    "UnknownKind": Message(
        "NX0002", "UnknownKind", "Error", "No schema for %s %s: not a Kubernetes or Istio kind"
    ),
    "WeightsDoNotSumTo100": Message(
        "NX0003",
        "WeightsDoNotSumTo100",
        "Error",
        "Route %q splits traffic with weights %s summing to %d, not 100",
    ),
    "CanaryRoutesDisagree": Message(
        "NX0004",
        "CanaryRoutesDisagree",
        "Error",
        "Route %q splits traffic %s but route %q splits it %s: every split route must agree",
    ),
    "TLSDisabledUnderStrict": Message(
        "NX0005",
        "TLSDisabledUnderStrict",
        "Error",
        "DestinationRule sets TLS mode %s for host %q, but mutual TLS is STRICT there (%s):"
        " calls through it would be refused",
    ),
    "MissingAuthorizationPolicy": Message(
        "NX0006",
        "MissingAuthorizationPolicy",
        "Error",
        "%s: no AuthorizationPolicy selects its workloads (%s)",
    ),
    "RetriesMultiply": Message(
        "NX0007",
        "RetriesMultiply",
        "Error",
        "Route %q retries %d times while the gateway retries in-app too (%s): the two multiply;"
        " set NARTHEX_GATEWAY_UPSTREAM_RETRIES=false or retries.attempts: 0",
    ),
    "MeshPolicyDisagrees": Message(
        "NX0008",
        "MeshPolicyDisagrees",
        "Error",
        "Route %q has %s %s but the gateway's in-app policy says %s (%s)",
    ),
    "WorkloadNotHardened": Message(
        "NX0009",
        "WorkloadNotHardened",
        "Error",
        "Container %q lacks what every narthex workload has: %s",
    ),
}


@dataclass(frozen=True)
class Finding:
    """One problem, naming the overlay, the file and the object it is in."""

    code: str
    name: str
    level: str  # error | warning | info: how narthex treats it (CI fails on error)
    message: str
    overlay: str
    file: str
    object: str

    def line(self) -> str:
        where = f"[{self.overlay}] {self.file}: {self.object}" if self.object else self.file
        return f"{self.level.upper()} {self.code} ({self.name}) {where}: {self.message}"

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _format(template: str, args: tuple[Any, ...]) -> str:
    """Go's fmt verbs as the analyzer templates use them: %s %v %d %q."""
    values = iter(args)

    def one(match: re.Match[str]) -> str:
        verb = match.group(1)
        if verb == "%":
            return "%"
        value = next(values)
        if verb == "q":
            return json.dumps(str(value))
        if verb == "d":
            return str(int(value))
        return str(value)

    return re.sub(r"%([sdvq%])", one, template)


class Catalogue:
    """Istio's messages by name (from the vendored catalogue) and narthex's own."""

    def __init__(self, istio_messages: Path) -> None:
        raw: Mapping[str, Any] = yaml.safe_load(istio_messages.read_text())
        self.messages: dict[str, Message] = {
            entry["name"]: Message(entry["code"], entry["name"], entry["level"], entry["template"])
            for entry in raw["messages"]
        }
        self.messages.update(NARTHEX_MESSAGES)

    def finding(
        self, name: str, obj: Obj | None, *args: Any, overlay: str = "", level: str = "error"
    ) -> Finding:
        """narthex fails CI on every check it runs, so `level` is error by default even where
        Istio's own level is lower (IST0118 is Info to istioctl: a port with a bad name still
        works, by protocol sniffing, but it is not what we ship)."""
        message = self.messages[name]
        return Finding(
            code=message.code,
            name=message.name,
            level=level,
            message=_format(message.template, args),
            overlay=obj.overlay if obj is not None else overlay,
            file=obj.file if obj is not None else "",
            object=obj.ref if obj is not None else "",
        )
