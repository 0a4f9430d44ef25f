"""The README lists every setting with its default, so it cannot drift from the code."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from narthex.analytics.settings import AnalyticsSettings
from narthex.auth.settings import AuthSettings
from narthex.common.settings import ServiceSettings
from narthex.features.settings import FeaturesSettings
from narthex.gateway.settings import GatewaySettings
from narthex.inference.settings import InferenceSettings

README = (Path(__file__).parent.parent / "README.md").read_text()
ALL_SETTINGS: tuple[type[ServiceSettings], ...] = (
    GatewaySettings,
    AuthSettings,
    FeaturesSettings,
    InferenceSettings,
    AnalyticsSettings,
)


def documented_default(value: object) -> str:
    if isinstance(value, SecretStr):
        return "(placeholder; required outside dev)"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


@pytest.mark.parametrize("settings", ALL_SETTINGS, ids=lambda cls: cls.service_name)
def test_every_setting_is_documented_with_its_default(settings: type[ServiceSettings]) -> None:
    prefix = str(settings.model_config["env_prefix"])
    for name, field in settings.model_fields.items():
        row = f"| `{prefix}{name.upper()}` | `{documented_default(field.default)}` |"
        assert row in README, f"README lacks or mis-states {prefix}{name.upper()}"


def test_the_two_commands_come_first() -> None:
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    assert "make run" in first_block
    assert "make test" in first_block
