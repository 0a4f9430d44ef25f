"""Cross-checks over one rendered overlay, in the spirit of `istioctl analyze`: references
resolve, selectors select, canary weights sum to 100, mTLS is never switched off under
STRICT, every service is behind an AuthorizationPolicy, ports are named for Istio, and the
mesh's retries and timeouts agree with the gateway's in-app policy."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from narthex.cli.mesh_findings import Catalogue, Finding
from narthex.cli.mesh_render import Obj

__all__ = ["CHECKS", "Inventory", "analyze", "parse_duration", "split_routes"]

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
# Istio's protocol prefixes for a Service port name: `<protocol>` or `<protocol>-<suffix>`.
PORT_PROTOCOLS = (
    "grpc", "grpc-web", "http", "http2", "https", "mongo", "mysql", "redis", "tcp", "tls",
    "udp",
)  # fmt: skip
ISTIO_ROOT_NAMESPACE = "istio-system"
CLUSTER_DOMAIN = "svc.cluster.local"
# The gateway's settings that the mesh must agree with (NARTHEX_GATEWAY_UPSTREAM_*).
GATEWAY_POLICY = ("upstream_retries", "upstream_max_attempts", "upstream_try_timeout",
                  "upstream_deadline")  # fmt: skip


def gateway_defaults() -> dict[str, str]:
    """Their defaults, from the gateway's own settings class: what a ConfigMap that does not
    set them leaves in force."""
    from narthex.gateway.settings import GatewaySettings

    fields = GatewaySettings.model_fields
    return {
        f"NARTHEX_GATEWAY_{name.upper()}": str(fields[name].default).lower()
        for name in GATEWAY_POLICY
    }


_FALSE = {"0", "false", "no", "off", "f", "n"}


def parse_duration(text: Any) -> float | None:
    """Seconds of a protobuf/Go duration such as `30s`, `1.5s`, `500ms`, `1m`."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h)?\s*", str(text))
    if not match:
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[match.group(2) or "s"]
    return float(match.group(1)) * scale


def _labels(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, Mapping) else {}


def _show(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


class Inventory:
    """One overlay's objects, indexed for the checks."""

    def __init__(self, objects: Sequence[Obj]) -> None:
        self.objects = list(objects)
        self.by_kind: dict[str, list[Obj]] = {}
        for obj in self.objects:
            self.by_kind.setdefault(obj.kind, []).append(obj)

    def kind(self, *kinds: str) -> list[Obj]:
        return [obj for kind in kinds for obj in self.by_kind.get(kind, [])]

    def find(self, kind: str, namespace: str, name: str) -> Obj | None:
        for obj in self.by_kind.get(kind, []):
            if obj.name == name and obj.namespace == namespace:
                return obj
        return None

    def pod_labels(self, namespace: str) -> list[tuple[Obj, dict[str, str]]]:
        """Each workload's pod template labels in `namespace`."""
        out = []
        for obj in self.kind(*WORKLOAD_KINDS):
            if obj.namespace == namespace:
                template = obj.spec.get("template") or {}
                out.append((obj, _labels((template.get("metadata") or {}).get("labels"))))
        return out

    def selects(self, namespace: str, selector: Mapping[str, str]) -> list[Obj]:
        return [
            workload
            for workload, labels in self.pod_labels(namespace)
            if all(labels.get(k) == v for k, v in selector.items())
        ]

    def host_service(self, host: str, namespace: str) -> bool:
        """Whether `host`, as an Istio config in `namespace` names it, is a Service here (or
        a ServiceEntry host): `name`, `name.ns`, `name.ns.svc.cluster.local`, or a
        `*.ns.svc.cluster.local` wildcard matching at least one."""
        if any(host in (entry.spec.get("hosts") or []) for entry in self.kind("ServiceEntry")):
            return True
        parts = host.split(".")
        if len(parts) == 1:
            parts = [parts[0], namespace]
        if len(parts) >= 2 and ".".join(parts[2:]) in ("", CLUSTER_DOMAIN, "svc"):
            name, ns = parts[0], parts[1]
            services = [s for s in self.kind("Service") if s.namespace == ns]
            return any(name in ("*", s.name) for s in services)
        return False

    def fqdn(self, host: str, namespace: str) -> str:
        parts = host.split(".")
        if len(parts) == 1:
            return f"{host}.{namespace}.{CLUSTER_DOMAIN}"
        if len(parts) == 2:
            return f"{host}.{CLUSTER_DOMAIN}"
        return host

    def destination_rule(self, host: str, namespace: str) -> Obj | None:
        """The DestinationRule Istio applies to `host`: an exact host first, else a wildcard."""
        fqdn = self.fqdn(host, namespace)
        exact, wildcard = None, None
        for rule in self.kind("DestinationRule"):
            ruled = self.fqdn(str(rule.spec.get("host", "")), rule.namespace)
            if ruled == fqdn:
                exact = exact or rule
            elif ruled.startswith("*.") and fqdn.endswith(ruled[1:]):
                wildcard = wildcard or rule
        return exact or wildcard

    def gateway_settings(self) -> tuple[dict[str, str], Obj | None]:
        """The gateway's NARTHEX_GATEWAY_* settings (its ConfigMap), defaults filled in."""
        for config in self.kind("ConfigMap"):
            data = _labels(config.body.get("data"))
            if any(key.startswith("NARTHEX_GATEWAY_") for key in data):
                return {**gateway_defaults(), **data}, config
        return gateway_defaults(), None


Check = Callable[[Inventory, Catalogue], Iterator[Finding]]
CHECKS: list[Check] = []


def check(fn: Check) -> Check:
    CHECKS.append(fn)
    return fn


def analyze(objects: Sequence[Obj], catalogue: Catalogue) -> list[Finding]:
    inventory = Inventory(objects)
    return [finding for fn in CHECKS for finding in fn(inventory, catalogue)]


def _http_routes(vs: Obj) -> list[Mapping[str, Any]]:
    return [r for r in vs.spec.get("http") or [] if isinstance(r, Mapping)]


def _route_name(route: Mapping[str, Any], index: int) -> str:
    return str(route.get("name") or f"http[{index}]")


def split_routes(vs: Mapping[str, Any]) -> list[tuple[str, list[Mapping[str, Any]]]]:
    """The routes of a VirtualService body that split traffic (more than one destination)."""
    spec = vs.get("spec") or {}
    out = []
    for index, route in enumerate(spec.get("http") or []):
        destinations = list(route.get("route") or [])
        if len(destinations) > 1:
            out.append((_route_name(route, index), destinations))
    return out


def _weights(destinations: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    return {
        str((d.get("destination") or {}).get("subset") or (d.get("destination") or {}).get("host")):
        int(d.get("weight") or 0)
        for d in destinations
    }  # fmt: skip


def _show_weights(weights: Mapping[str, int]) -> str:
    return " ".join(f"{subset}={weight}" for subset, weight in weights.items())


# -- references ---------------------------------------------------------------------------------


@check
def subsets_exist(inv: Inventory, cat: Catalogue) -> Iterator[Finding]:
    """IST0101: a VirtualService's destination subset is defined in the host's rule."""
    for vs in inv.kind("VirtualService"):
        for route in _http_routes(vs):
            for item in route.get("route") or []:
                destination = item.get("destination") or {}
                host, subset = str(destination.get("host", "")), destination.get("subset")
                if not subset:
                    continue
                rule = inv.destination_rule(host, vs.namespace)
                names = {s.get("name") for s in (rule.spec.get("subsets") or [])} if rule else set()
                if subset not in names:
                    yield cat.finding(
                        "ReferencedResourceNotFound",
                        vs,
                        "host+subset in destinationrule",
                        f"{host}+{subset}",
                    )


@check
def hosts_are_services(inv: Inventory, cat: Catalogue) -> Iterator[Finding]:
    """IST0101: every destination host, and every DestinationRule host, is a Service."""
    for vs in inv.kind("VirtualService"):
        for route in _http_routes(vs):
            for item in route.get("route") or []:
                host = str((item.get("destination") or {}).get("host", ""))
                if not inv.host_service(host, vs.namespace):
                    yield cat.finding("ReferencedResourceNotFound", vs, "host", host)
    for rule in inv.kind("DestinationRule"):
        host = str(rule.spec.get("host", ""))
        if not inv.host_service(host, rule.namespace):
            yield cat.finding("ReferencedResourceNotFound", rule, "host", host)


@check
def gateways_exist(inv: Inventory, cat: Catalogue) -> Iterator[Finding]:
    """IST0101: a VirtualService's gateways exist (`mesh` is the sidecars, always there)."""
    for vs in inv.kind("VirtualService"):
        for gateway in vs.spec.get("gateways") or []:
            if gateway == "mesh":
                continue
            namespace, _, name = str(gateway).rpartition("/")
            if inv.find("Gateway", namespace or vs.namespace, name) is None:
                yield cat.finding("ReferencedResourceNotFound", vs, "gateway", gateway)


@check
def hpa_targets_exist(inv: Inventory, cat: Catalogue) -> Iterator[Finding]:
    """IST0101 (Kubernetes edition): an HPA's scaleTargetRef names a workload here."""
    for hpa in inv.kind("HorizontalPodAutoscaler"):
        target = hpa.spec.get("scaleTargetRef") or {}
        kind, name = str(target.get("kind", "")), str(target.get("name", ""))
        if inv.find(kind, hpa.namespace, name) is None:
            yield cat.finding("ReferencedResourceNotFound", hpa, "scaleTargetRef", f"{kind}/{name}")


@check
def principals_exist(inv: Inventory, cat: Catalogue) -> Iterator[Finding]:
    """IST0101: an AuthorizationPolicy principal in a namespace rendered here names one of
    its ServiceAccounts (a typo would silently allow nobody)."""
    rendered = {account.namespace for account in inv.kind("ServiceAccount")}
    for policy in inv.kind("AuthorizationPolicy"):
        for rule in policy.spec.get("rules") or []:
            for source in rule.get("from") or []:
                for principal in (source.get("source") or {}).get("principals") or []:
                    match = re.fullmatch(r"cluster\.local/ns/([^/]+)/sa/([^/*]+)", str(principal))
                    if not match or match.group(1) not in rendered:
                        continue
                    if inv.find("ServiceAccount", match.group(1), match.group(2)) is None:
                        yield cat.finding(
                            "ReferencedResourceNotFound", policy, "service account", principal
                        )


# -- selectors ----------------------------------------------------------------------------------


def _selectors(obj: Obj) -> Iterator[dict[str, str]]:
    spec = obj.spec
    if obj.kind == "Service":
        if spec.get("selector"):
            yield _labels(spec.get("selector"))
    elif obj.kind in ("PodDisruptionBudget", *WORKLOAD_KINDS):
        selector = spec.get("selector") or {}
        if selector.get("matchLabels") and not selector.get("matchExpressions"):
            yield _labels(selector.get("matchLabels"))
    elif obj.kind == "NetworkPolicy":
        selector = spec.get("podSelector") or {}
        if selector.get("matchLabels"):
            yield _labels(selector.get("matchLabels"))
    elif obj.kind in ("AuthorizationPolicy", "PeerAuthentication", "RequestAuthentication"):
        labels = (spec.get("selector") or {}).get("matchLabels")
        if labels:
            yield _labels(labels)
    elif obj.kind == "Sidecar":
        labels = (spec.get("workloadSelector") or {}).get("labels")
        if labels:
            yield _labels(labels)


@check
def selectors_match(inv: Inventory, cat: Catalogue) -> Iterator[Finding]:
    """IST0127: a selector (Service, PDB, Deployment, NetworkPolicy, Istio policy, subset)
    selects at least one workload's pods."""
    for obj in inv.objects:
        if obj.namespace == ISTIO_ROOT_NAMESPACE:
            continue  # the root namespace's policies select across the mesh
        for selector in _selectors(obj):
            if not inv.selects(obj.namespace, selector):
                yield cat.finding("NoMatchingWorkloadsFound", obj, _show(selector))
    for rule in inv.kind("DestinationRule"):
        host = inv.fqdn(str(rule.spec.get("host", "")), rule.namespace)
        service = inv.find("Service", host.split(".")[1], host.split(".")[0])
        base = _labels(service.spec.get("selector")) if service else {}
        for subset in rule.spec.get("subsets") or []:
            labels = {**base, **_labels(subset.get("labels"))}
            if service is not None and not inv.selects(service.namespace, labels):
                yield cat.finding("NoMatchingWorkloadsFound", rule, _show(labels))


# -- traffic ------------------------------------------------------------------------------------


@check
def weights_sum_to_100(inv: Inventory, cat: Catalogue) -> Iterator[Finding]:
    """NX0003 / NX0004: a split sums to 100, and every split route of one VirtualService
    splits the same way (the canary is one decision, not one per route)."""
    for vs in inv.kind("VirtualService"):
        first: tuple[str, dict[str, int]] | None = None
        for name, destinations in split_routes(vs.body):
            weights = _weights(destinations)
            total = sum(weights.values())
            if total != 100:
                yield cat.finding("WeightsDoNotSumTo100", vs, name, _show_weights(weights), total)
            elif first is None:
                first = (name, weights)
            elif weights != first[1]:
                yield cat.finding(
                    "CanaryRoutesDisagree",
                    vs,
                    name,
                    _show_weights(weights),
                    first[0],
                    _show_weights(first[1]),
                )


def _strict_scope(inv: Inventory, namespace: str) -> str | None:
    """Where STRICT mTLS comes from for `namespace`, if it is STRICT (namespace-wide policy
    first, then the mesh-wide one in the root namespace)."""
    for scope in (namespace, ISTIO_ROOT_NAMESPACE):
        for policy in inv.kind("PeerAuthentication"):
            if policy.namespace == scope and not policy.spec.get("selector"):
                mode = (policy.spec.get("mtls") or {}).get("mode")
                if mode and mode != "UNSET":
                    return f"PeerAuthentication {scope}/{policy.name}" if mode == "STRICT" else None
    return None


def _tls_modes(rule: Obj) -> Iterator[str]:
    policies = [rule.spec.get("trafficPolicy") or {}]
    policies += [s.get("trafficPolicy") or {} for s in rule.spec.get("subsets") or []]
    for policy in policies:
        yield str((policy.get("tls") or {}).get("mode", ""))
        for port in policy.get("portLevelSettings") or []:
            yield str((port.get("tls") or {}).get("mode", ""))


@check
def tls_kept_under_strict(inv: Inventory, cat: Catalogue) -> Iterator[Finding]:
    """NX0005: no DestinationRule turns TLS off towards a namespace whose peers demand mTLS."""
    for rule in inv.kind("DestinationRule"):
        fqdn = inv.fqdn(str(rule.spec.get("host", "")), rule.namespace)
        parts = fqdn.split(".")
        if len(parts) < 3:
            continue
        scope = _strict_scope(inv, parts[1])
        if scope and "DISABLE" in set(_tls_modes(rule)):
            yield cat.finding("TLSDisabledUnderStrict", rule, "DISABLE", fqdn, scope)


@check
def services_have_authorization(inv: Inventory, cat: Catalogue) -> Iterator[Finding]:
    """NX0006: every Service in a sidecar-injected namespace has an AuthorizationPolicy that
    selects its pods, and the namespace denies by default."""
    injected = {
        ns.name
        for ns in inv.kind("Namespace")
        if _labels(ns.metadata.get("labels")).get("istio-injection") == "enabled"
    }
    for namespace in sorted(injected):
        policies = [p for p in inv.kind("AuthorizationPolicy") if p.namespace == namespace]
        if not any(not p.spec.get("selector") and not p.spec.get("rules") for p in policies):
            ns = inv.find("Namespace", "", namespace)
            yield cat.finding(
                "MissingAuthorizationPolicy",
                ns,
                f"namespace {namespace}",
                "no allow-nothing policy: what is not allowed is not denied",
            )
        for service in inv.kind("Service"):
            selector = _labels(service.spec.get("selector"))
            if service.namespace != namespace or not selector:
                continue
            chosen = [_labels((p.spec.get("selector") or {}).get("matchLabels")) for p in policies]
            covered = any(
                labels and all(selector.get(k) == v for k, v in labels.items()) for labels in chosen
            )
            if not covered:
                yield cat.finding(
                    "MissingAuthorizationPolicy",
                    service,
                    f"Service {service.name}",
                    f"selector {_show(selector)}",
                )


@check
def ports_named_for_istio(inv: Inventory, cat: Catalogue) -> Iterator[Finding]:
    """IST0118: a Service port's name starts with its protocol (or appProtocol is set)."""
    for service in inv.kind("Service"):
        for port in service.spec.get("ports") or []:
            if port.get("appProtocol"):
                continue
            name = str(port.get("name") or "")
            if not any(name == p or name.startswith(p + "-") for p in PORT_PROTOCOLS):
                yield cat.finding(
                    "PortNameIsNotUnderNamingConvention",
                    service,
                    name,
                    int(port.get("port") or 0),
                    str(port.get("targetPort", port.get("port", ""))),
                )


def _from_gateway(route: Mapping[str, Any]) -> bool:
    """Whether the gateway's calls may take this route (no match restricts the source to
    another workload)."""
    matches = route.get("match") or [{}]
    return any(_labels(m.get("sourceLabels")).get("app", "gateway") == "gateway" for m in matches)


def _seconds(value: Any) -> float | None:
    return parse_duration(value) if value else None


def _catches_gateway(route: Mapping[str, Any]) -> bool:
    """Whether every call of the gateway's that reaches this route takes it."""
    matches = route.get("match") or [{}]
    return any(
        set(m) <= {"sourceLabels"} and _labels(m.get("sourceLabels")) in ({}, {"app": "gateway"})
        for m in matches
    )


@check
def mesh_agrees_with_gateway(inv: Inventory, cat: Catalogue) -> Iterator[Finding]:
    """NX0007 / NX0008: on the routes the gateway's calls take, the mesh retries only when
    the gateway does not, and its tries, per-try timeout and overall timeout are the
    gateway's (NARTHEX_GATEWAY_UPSTREAM_*): one policy, enforced in one place."""
    settings, config = inv.gateway_settings()
    if config is None:
        return
    in_app = settings["NARTHEX_GATEWAY_UPSTREAM_RETRIES"].strip().lower() not in _FALSE
    attempts = int(settings["NARTHEX_GATEWAY_UPSTREAM_MAX_ATTEMPTS"]) - 1
    try_timeout = float(settings["NARTHEX_GATEWAY_UPSTREAM_TRY_TIMEOUT"])
    deadline = float(settings["NARTHEX_GATEWAY_UPSTREAM_DEADLINE"])
    source = f"ConfigMap {config.namespace}/{config.name}"
    for vs in inv.kind("VirtualService"):
        if [g for g in vs.spec.get("gateways") or [] if g != "mesh"]:
            continue  # the public edge: in front of the gateway, not behind it
        hosts = [inv.fqdn(str(h), vs.namespace) for h in vs.spec.get("hosts") or []]
        if any(h.startswith("gateway.") for h in hosts):
            continue
        caught = False  # a previous route takes every call of the gateway's
        for index, route in enumerate(_http_routes(vs)):
            if caught or not _from_gateway(route):
                continue
            caught = _catches_gateway(route)
            name = _route_name(route, index)
            retries = route.get("retries")
            # No retries block means Istio's default: 2 retries.
            mesh_attempts = 2 if retries is None else int(retries.get("attempts") or 0)
            if in_app and mesh_attempts > 0:
                yield cat.finding(
                    "RetriesMultiply",
                    vs,
                    name,
                    mesh_attempts,
                    f"NARTHEX_GATEWAY_UPSTREAM_RETRIES in {source}",
                )
                continue
            if in_app:
                continue
            per_try = (retries or {}).get("perTryTimeout")
            wanted = [
                # the mesh retries what the gateway would have: its tries less the first
                ("retries.attempts", float(mesh_attempts), float(attempts), "", "MAX_ATTEMPTS"),
                ("timeout", _seconds(route.get("timeout")), deadline, "s", "DEADLINE"),
                ("retries.perTryTimeout", _seconds(per_try), try_timeout, "s", "TRY_TIMEOUT"),
            ]
            for field, have, want, unit, setting in wanted:
                if have != want:
                    yield cat.finding(
                        "MeshPolicyDisagrees",
                        vs,
                        name,
                        field,
                        "unset" if have is None else f"{have:g}{unit}",
                        f"{want:g}{unit}" + (" (tries - 1)" if not unit else ""),
                        f"NARTHEX_GATEWAY_UPSTREAM_{setting} in {source}",
                    )


def _missing_hardening(pod: Mapping[str, Any], container: Mapping[str, Any]) -> list[str]:
    pod_context = pod.get("securityContext") or {}
    context = container.get("securityContext") or {}
    seccomp = (context.get("seccompProfile") or pod_context.get("seccompProfile") or {}).get("type")
    mounts = {m.get("mountPath") for m in container.get("volumeMounts") or []}
    probes = {
        name: ((container.get(name) or {}).get("httpGet") or {}).get("path")
        for name in ("livenessProbe", "readinessProbe")
    }
    resources = container.get("resources") or {}
    wanted = {
        "runAsNonRoot": bool(context.get("runAsNonRoot", pod_context.get("runAsNonRoot"))),
        "readOnlyRootFilesystem": context.get("readOnlyRootFilesystem") is True,
        "allowPrivilegeEscalation: false": context.get("allowPrivilegeEscalation") is False,
        "capabilities.drop ALL": "ALL" in ((context.get("capabilities") or {}).get("drop") or []),
        "seccompProfile RuntimeDefault": seccomp == "RuntimeDefault",
        "a writable /tmp": "/tmp" in mounts,  # noqa: S108 - a path in the pod, not ours
        "livenessProbe on /healthz": probes["livenessProbe"] == "/healthz",
        "readinessProbe on /readyz": probes["readinessProbe"] == "/readyz",
        "resources.requests and limits": bool(resources.get("requests"))
        and bool(resources.get("limits")),
    }
    return [name for name, ok in wanted.items() if not ok]


@check
def workloads_hardened(inv: Inventory, cat: Catalogue) -> Iterator[Finding]:
    """NX0009: every container of a workload runs as the platform's baseline says: non-root,
    read-only root filesystem (with a writable /tmp), no privilege escalation, no
    capabilities, the runtime's seccomp profile, probes on /healthz and /readyz, resources."""
    for workload in inv.kind(*WORKLOAD_KINDS):
        pod = (workload.spec.get("template") or {}).get("spec") or {}
        for container in pod.get("containers") or []:
            missing = _missing_hardening(pod, container)
            if missing:
                yield cat.finding(
                    "WorkloadNotHardened", workload, container.get("name", "?"), ", ".join(missing)
                )
