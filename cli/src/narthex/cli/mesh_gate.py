"""The promotion gate: the canary's error rate and p99 latency against the stable version's,
from Prometheus, and a verdict that says by how much the canary is worse."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from string import Template

import httpx

from narthex.cli.mesh_plan import CanaryPlan, Gate

__all__ = ["QUERIES", "GateError", "Measured", "Verdict", "judge", "measure"]

QUERIES = ("requests", "errors", "p99")
QUERY_TIMEOUT_S = 10.0


class GateError(RuntimeError):
    """Prometheus could not answer (unreachable, or a query it refused)."""


@dataclass(frozen=True)
class Measured:
    """One subset over the window."""

    subset: str
    requests: float
    errors: float
    p99: float | None  # seconds; None without a request in the window

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests > 0 else 0.0


@dataclass(frozen=True)
class Verdict:
    stable: Measured
    canary: Measured
    reasons: list[str] = field(default_factory=list)  # why not; empty when it may step
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.reasons

    def summary(self) -> str:
        def one(m: Measured) -> str:
            p99 = "n/a" if m.p99 is None else f"{m.p99 * 1000:.1f} ms"
            return f"{m.subset}: {m.requests:.0f} requests, {m.error_rate:.2%} errors, p99 {p99}"

        return f"{one(self.stable)}; {one(self.canary)}"


def _query(client: httpx.Client, promql: str, at: float | None = None) -> float | None:
    params = {"query": promql} if at is None else {"query": promql, "time": repr(at)}
    try:
        response = client.get("/api/v1/query", params=params)
    except httpx.HTTPError as exc:
        raise GateError(f"Prometheus unreachable: {exc}") from None
    try:
        body = response.json()
    except ValueError:
        raise GateError(f"Prometheus answered {response.status_code}, not JSON") from None
    if body.get("status") != "success":
        raise GateError(f"Prometheus refused {promql!r}: {body.get('error', response.text)}")
    result = body["data"]["result"]
    if body["data"]["resultType"] == "scalar":
        value = float(result[1])
    elif not result:
        return None
    else:
        value = float(result[0]["value"][1])
    return None if math.isnan(value) or math.isinf(value) else value


def measure(client: httpx.Client, plan: CanaryPlan, gate: Gate, subset: str, at: float) -> Measured:
    """One subset's numbers, every query evaluated at the same instant `at` (queries at
    different instants extrapolate their windows differently: errors could exceed requests)."""
    queries = gate.queries or {}
    missing = [name for name in QUERIES if name not in queries]
    if missing:
        raise GateError(f"the gate has no query for {', '.join(missing)} (mesh/canary.yaml)")
    values = {
        name: _query(
            client,
            Template(queries[name]).safe_substitute(
                service=plan.service, subset=subset, window=gate.window
            ),
            at,
        )
        for name in QUERIES
    }
    return Measured(subset, values["requests"] or 0.0, values["errors"] or 0.0, values["p99"])


def judge(
    prometheus_url: str,
    plan: CanaryPlan,
    gate: Gate,
    canary_weight: int,
    transport: httpx.BaseTransport | None = None,
) -> Verdict:
    """Whether the canary may take its next step, with the margins by which it failed."""
    with httpx.Client(
        base_url=prometheus_url.rstrip("/"), timeout=QUERY_TIMEOUT_S, transport=transport
    ) as client:
        # Prometheus's own clock, not ours: a laptop's skew must not move the window.
        now = _query(client, "time()")
        if now is None:
            raise GateError("Prometheus did not say what time it is")
        stable = measure(client, plan, gate, plan.stable, now)
        canary = measure(client, plan, gate, plan.canary, now)
    return compare(stable, canary, gate, canary_weight)


def compare(stable: Measured, canary: Measured, gate: Gate, canary_weight: int) -> Verdict:
    reasons: list[str] = []
    notes: list[str] = []
    if canary.requests < gate.min_requests:
        if canary_weight == 0 and canary.requests == 0:
            notes.append(f"{canary.subset} has no traffic yet: the first step is not compared")
            return Verdict(stable, canary, reasons, notes)
        reasons.append(
            f"too little traffic to judge: {canary.subset} served {canary.requests:.0f}"
            f" requests in {gate.window}, the gate needs {gate.min_requests:.0f}"
        )
        return Verdict(stable, canary, reasons, notes)
    if stable.requests < gate.min_requests:
        reasons.append(
            f"too little traffic to compare with: {stable.subset} served"
            f" {stable.requests:.0f} requests in {gate.window}, the gate needs"
            f" {gate.min_requests:.0f}"
        )
        return Verdict(stable, canary, reasons, notes)
    worse = canary.error_rate - stable.error_rate
    if worse > gate.max_error_rate_increase:
        reasons.append(
            f"error rate {canary.error_rate:.2%} on {canary.subset} against"
            f" {stable.error_rate:.2%} on {stable.subset}: {worse * 100:.2f} points worse,"
            f" {(worse - gate.max_error_rate_increase) * 100:.2f} points past the"
            f" {gate.max_error_rate_increase * 100:.2f}-point threshold"
        )
    if canary.p99 is not None and stable.p99 is not None:
        allowed = max(stable.p99 * gate.max_p99_ratio, stable.p99 + gate.p99_slack_seconds)
        if canary.p99 > allowed:
            ratio = canary.p99 / stable.p99 if stable.p99 > 0 else math.inf
            reasons.append(
                f"p99 {canary.p99 * 1000:.1f} ms on {canary.subset} against"
                f" {stable.p99 * 1000:.1f} ms on {stable.subset}:"
                f" +{(canary.p99 - stable.p99) * 1000:.1f} ms (x{ratio:.2f}),"
                f" {(canary.p99 - allowed) * 1000:.1f} ms past the allowed"
                f" {allowed * 1000:.1f} ms (x{gate.max_p99_ratio:g} or"
                f" +{gate.p99_slack_seconds * 1000:g} ms)"
            )
    elif canary.p99 is None:
        reasons.append(f"no latency histogram for {canary.subset} in {gate.window}")
    return Verdict(stable, canary, reasons, notes)
