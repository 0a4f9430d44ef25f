"""Drift end to end: fraud scores through the gateway and a real inference process, prediction
events through Redis Streams, PSI in the analytics process against each version's baseline.

Two tenants score the simulator's transactions on both fraud versions: one as simulated (the
control), one with its latest days shifted (amounts x20, at hours twelve off the accounts'
habits). The drifted tenant's traffic is flagged on both versions; the control is not.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import numpy as np
import pytest

from narthex.transactions import simulate
from narthex.transactions.simulator import LabeledTransaction
from narthex.transactions.training import training_set
from tests.support.analytics import AnalyticsProcess, metric_sum
from tests.support.databases import sqlite_url
from tests.support.models import builtin_repository
from tests.support.platform import Admin, PlanNumbers, PrivateRedis, Tenant, edge, running

# Real processes on a small shared machine: minutes, not the default two.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DAY = 86_400
DRIFT_FROM_DAY = 10
ROWS_PER_REQUEST = 99
THRESHOLD = 0.2


def rows(shifted: bool) -> np.ndarray:
    """Model inputs of the simulator's transactions from DRIFT_FROM_DAY on, each with its
    account's history before it; `shifted`: those days' amounts x20, twelve hours later."""
    events = simulate(seed=11, accounts=40, days=14)
    cut = events[0].transaction.timestamp + DRIFT_FROM_DAY * DAY

    def shift(event: LabeledTransaction) -> LabeledTransaction:
        tx = event.transaction
        if not shifted or tx.timestamp < cut:
            return event
        moved = dataclasses.replace(tx, amount=tx.amount * 20, timestamp=tx.timestamp + DAY / 2)
        return dataclasses.replace(event, transaction=moved)

    data = training_set([shift(e) for e in events])
    late: np.ndarray = data.inputs[data.timestamps >= cut]
    return late


def infer_body(batch: np.ndarray) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "features",
                "datatype": "FP32",
                "shape": list(batch.shape),
                "data": batch.reshape(-1).tolist(),
            }
        ]
    }


@dataclasses.dataclass
class DriftStack:
    gateway: str
    analytics: AnalyticsProcess
    admin: Admin
    admin_key: str


@pytest.fixture(scope="module")
def drift_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DriftStack]:
    directory = tmp_path_factory.mktemp("drift")
    repository = builtin_repository(["fraud"])
    with ExitStack() as stack:
        redis = PrivateRedis(directory)
        redis.start()
        stack.callback(redis.stop)
        platform = stack.enter_context(edge(directory))
        analytics = AnalyticsProcess(
            directory,
            "analytics",
            {
                "NARTHEX_ANALYTICS_AUTH_URL": platform.auth.url,
                "NARTHEX_ANALYTICS_DATABASE_URL": sqlite_url(directory, "analytics.db"),
                "NARTHEX_ANALYTICS_REDIS_URL": redis.url,
                "NARTHEX_ANALYTICS_MODEL_REPOSITORY": str(repository),
                "NARTHEX_ANALYTICS_BLOCK_MS": "200",
                "NARTHEX_ANALYTICS_DRIFT_INTERVAL_SECONDS": "0.5",
            },
        )
        stack.callback(analytics.stop)
        analytics.start()
        (inference,) = stack.enter_context(
            running([platform.inference("inference", repository, redis_url=redis.url)], directory)
        )
        (gateway,) = stack.enter_context(
            running(
                [
                    platform.gateway(
                        "gateway",
                        redis_url=redis.url,
                        inference_url=inference.url,
                        analytics_url=analytics.url,
                    )
                ],
                directory,
            )
        )
        admin = Admin(gateway.url, platform.admin_key)
        stack.callback(admin.close)
        yield DriftStack(gateway.url, analytics, admin, platform.admin_key)


def score(gateway: str, tenant: Tenant, data: np.ndarray) -> int:
    sent = 0
    with httpx.Client(base_url=gateway, headers=tenant.headers, timeout=30) as client:
        for version in (1, 2):
            for start in range(0, len(data), ROWS_PER_REQUEST):
                batch = data[start : start + ROWS_PER_REQUEST]
                response = client.post(
                    f"/v2/models/fraud/versions/{version}/infer", json=infer_body(batch)
                )
                assert response.status_code == 200, response.text
                sent += len(batch)
    return sent


def drift_of(stack: DriftStack, tenant: Tenant, predictions: int) -> dict[str, dict[str, Any]]:
    """Per version, once every prediction the tenant made is counted (30 s at most)."""
    deadline = time.monotonic() + 30
    while True:
        response = httpx.get(
            stack.gateway + "/v1/admin/drift",
            params={"tenant": tenant.id},
            headers={"X-API-Key": stack.admin_key},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        versions = {v["version"]: v for v in response.json()["versions"]}
        if sum(v["predictions"] for v in versions.values()) >= predictions:
            return versions
        assert time.monotonic() < deadline, response.text
        time.sleep(0.3)


def test_drifted_traffic_is_flagged_on_both_versions_and_the_control_is_not(
    drift_stack: DriftStack,
) -> None:
    plan = drift_stack.admin.create_plan("drift", PlanNumbers(rate=10_000.0, burst=10_000))
    control = drift_stack.admin.create_tenant("control", plan)
    drifted = drift_stack.admin.create_tenant("drifted", plan)

    control_sent = score(drift_stack.gateway, control, rows(shifted=False))
    drifted_sent = score(drift_stack.gateway, drifted, rows(shifted=True))

    calm = drift_of(drift_stack, control, control_sent)
    moved = drift_of(drift_stack, drifted, drifted_sent)
    for version in ("1", "2"):
        assert calm[version]["baseline"] is True
        assert calm[version]["predictions"] == control_sent // 2
        assert calm[version]["psi"] < THRESHOLD, calm[version]
        assert calm[version]["flagged"] is False
        assert moved[version]["psi"] > THRESHOLD, moved[version]
        assert moved[version]["flagged"] is True
    # Every tenant together: the gauges carry the mixture's PSI per version, set by the
    # drift loop (every 0.5 s here), which may not have run since the last events.
    deadline = time.monotonic() + 30
    while not all(
        metric_sum(drift_stack.analytics.url, "analytics_drift_psi", model="fraud", version=v) > 0
        for v in ("1", "2")
    ):
        assert time.monotonic() < deadline, "no drift gauges"
        time.sleep(0.3)
