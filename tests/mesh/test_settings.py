"""The ConfigMaps set real settings: every NARTHEX_<SERVICE>_* key in every overlay is a
field of that service's settings class, and its value is one the service accepts."""

from __future__ import annotations

import pytest

from narthex.analytics.settings import AnalyticsSettings
from narthex.auth.settings import AuthSettings
from narthex.cli.mesh_render import render
from narthex.common.settings import ServiceSettings
from narthex.features.settings import FeaturesSettings
from narthex.gateway.settings import GatewaySettings
from narthex.inference.settings import InferenceSettings
from tests.mesh.conftest import MESH

SETTINGS: dict[str, type[ServiceSettings]] = {
    "gateway": GatewaySettings,
    "auth": AuthSettings,
    "features": FeaturesSettings,
    "inference": InferenceSettings,
    "analytics": AnalyticsSettings,
}


@pytest.mark.parametrize("overlay", ["dev", "prod", "gpu"])
def test_configmaps_hold_real_settings_with_valid_values(overlay: str) -> None:
    configs = {
        obj.name: dict(obj.body["data"])
        for obj in render(MESH / "overlays" / overlay, MESH)
        if obj.kind == "ConfigMap"
    }
    assert set(configs) == set(SETTINGS)
    for service, cls in SETTINGS.items():
        prefix = f"NARTHEX_{service.upper()}_"
        fields = {f"{prefix}{name.upper()}" for name in cls.model_fields}
        data = configs[service]
        assert set(data) <= fields, f"{service}: not settings: {sorted(set(data) - fields)}"
        # Validated as the service validates its environment (secrets come from Secrets:
        # stand-ins here, for the prod overlays' placeholder check).
        values = {key.removeprefix(prefix).lower(): value for key, value in data.items()}
        secrets = {
            name: "s3cret-from-a-k8s-secret" for name in ("key_pepper",) if name in cls.model_fields
        }
        cls.model_validate({**values, **secrets})


def test_the_gateway_leaves_retries_to_the_mesh() -> None:
    gateway = next(
        obj
        for obj in render(MESH / "overlays" / "prod", MESH)
        if obj.kind == "ConfigMap" and obj.name == "gateway"
    )
    settings = GatewaySettings.model_validate(
        {k.removeprefix("NARTHEX_GATEWAY_").lower(): v for k, v in gateway.body["data"].items()}
    )
    assert settings.client_policy().retries is False
