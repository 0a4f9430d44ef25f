"""What each overlay promises, read off the rendered objects: dev is one replica of
everything, prod autoscales and spreads, gpu puts inference on GPU nodes."""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

from narthex.cli.mesh_render import render
from tests.mesh.conftest import MESH

SERVICES = ("gateway", "auth", "features", "inference-v1", "inference-v2", "analytics")


@cache
def objects(overlay: str) -> dict[tuple[str, str], Mapping[str, Any]]:
    return {(o.kind, o.name): o.body for o in render(MESH / "overlays" / overlay, MESH)}


def pod(overlay: str, name: str) -> Mapping[str, Any]:
    spec: Mapping[str, Any] = objects(overlay)[("Deployment", name)]["spec"]["template"]["spec"]
    return spec


def test_dev_runs_one_replica_of_everything_without_autoscaling() -> None:
    dev = objects("dev")
    assert {
        name: dev[("Deployment", name)]["spec"]["replicas"] for name in SERVICES
    } == dict.fromkeys(SERVICES, 1)
    assert not [key for key in dev if key[0] == "HorizontalPodAutoscaler"]


def test_prod_autoscales_the_gateway_on_cpu_and_inference_on_its_queue() -> None:
    prod = objects("prod")
    gateway = prod[("HorizontalPodAutoscaler", "gateway")]["spec"]
    assert gateway["metrics"][0]["resource"]["name"] == "cpu"
    for version in ("inference-v1", "inference-v2"):
        hpa = prod[("HorizontalPodAutoscaler", version)]["spec"]
        assert hpa["scaleTargetRef"]["name"] == version
        assert hpa["metrics"][0]["pods"]["metric"]["name"] == "inference_queue_depth"
    assert prod[("Deployment", "gateway")]["spec"]["replicas"] == 3
    assert prod[("PodDisruptionBudget", "gateway")]["spec"] == {
        "minAvailable": 2,
        "selector": {"matchLabels": {"app": "gateway"}},
    }
    for name in SERVICES:
        affinity = pod("prod", name)["affinity"]["podAntiAffinity"]
        term = affinity["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert term["matchLabelKeys"] == ["app", "version"]


def test_the_queue_depth_metric_is_the_one_inference_exports() -> None:
    from prometheus_client import CollectorRegistry

    from narthex.inference.metrics import InferenceMetrics

    metrics = InferenceMetrics(CollectorRegistry())
    assert metrics.queue_depth._name == "inference_queue_depth"
    assert "inference_queue_depth" in (MESH / "prometheus-adapter" / "values.yaml").read_text()


def test_gpu_puts_inference_on_gpu_nodes_and_nothing_else() -> None:
    gpu = objects("gpu")
    for name in ("inference-v1", "inference-v2"):
        spec = pod("gpu", name)
        container = spec["containers"][0]
        assert container["image"].startswith("narthex/inference-gpu:")
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
            "tolerations"
        ]
    assert gpu[("ConfigMap", "inference")]["data"]["NARTHEX_INFERENCE_PROVIDER"] == "cuda"
    for name in ("gateway", "auth", "features", "analytics"):
        assert "nodeSelector" not in pod("gpu", name)
        assert "nvidia.com/gpu" not in pod("gpu", name)["containers"][0]["resources"]["limits"]


def test_the_canary_runs_its_own_image_entry() -> None:
    images = {
        name: pod("prod", name)["containers"][0]["image"]
        for name in ("inference-v1", "inference-v2")
    }
    assert images == {
        "inference-v1": "narthex/inference:sha-0000000",
        "inference-v2": "narthex/inference:sha-0000000",
    }
    kustomization = (MESH / "base" / "app" / "kustomization.yaml").read_text()
    assert "- name: narthex/inference-canary\n    newName: narthex/inference\n" in kustomization
