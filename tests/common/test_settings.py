"""Settings: typed env parsing, fail-fast with one line naming the setting, placeholders refused."""

from __future__ import annotations

from typing import ClassVar

import pytest
from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from narthex.common.settings import ServiceSettings, SettingsError, load_settings


class DemoSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="NARTHEX_DEMO_")
    service_name: ClassVar[str] = "demo"

    api_secret: SecretStr = Field(SecretStr("dev-secret-change-me"))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("NARTHEX_DEMO_"):
            monkeypatch.delenv(name)
    # DemoSettings ships a placeholder secret, which only dev accepts; the default is below.
    monkeypatch.setenv("NARTHEX_DEMO_ENV", "dev")


def test_reads_typed_values_from_prefixed_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NARTHEX_DEMO_PORT", "9123")
    monkeypatch.setenv("NARTHEX_DEMO_LOG_JSON", "false")
    settings = load_settings(DemoSettings)
    assert settings.port == 9123
    assert settings.log_json is False


def test_non_numeric_port_is_one_line_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NARTHEX_DEMO_PORT", "eighty")
    with pytest.raises(SettingsError) as caught:
        load_settings(DemoSettings)
    message = caught.value.message
    assert "\n" not in message
    assert "NARTHEX_DEMO_PORT" in message
    assert message.startswith("demo: invalid configuration")


def test_out_of_range_port_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NARTHEX_DEMO_PORT", "70000")
    with pytest.raises(SettingsError, match="NARTHEX_DEMO_PORT"):
        load_settings(DemoSettings)


def test_several_problems_are_all_named_on_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NARTHEX_DEMO_PORT", "x")
    monkeypatch.setenv("NARTHEX_DEMO_LOG_LEVEL", "LOUD")
    with pytest.raises(SettingsError) as caught:
        load_settings(DemoSettings)
    assert "NARTHEX_DEMO_PORT" in caught.value.message
    assert "NARTHEX_DEMO_LOG_LEVEL" in caught.value.message
    assert "\n" not in caught.value.message


def test_with_nothing_configured_a_service_is_in_production(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NARTHEX_DEMO_ENV")
    assert ServiceSettings().env == "prod"
    with pytest.raises(SettingsError, match="NARTHEX_DEMO_API_SECRET"):
        load_settings(DemoSettings)


def test_placeholder_secret_is_fine_in_dev() -> None:
    settings = load_settings(DemoSettings)
    assert settings.env == "dev"
    assert settings.api_secret.get_secret_value().startswith("dev-")


@pytest.mark.parametrize("env", ["prod", "test"])
def test_placeholder_secret_is_refused_outside_dev(
    monkeypatch: pytest.MonkeyPatch, env: str
) -> None:
    monkeypatch.setenv("NARTHEX_DEMO_ENV", env)
    with pytest.raises(SettingsError) as caught:
        load_settings(DemoSettings)
    assert "NARTHEX_DEMO_API_SECRET" in caught.value.message
    assert "dev-secret" not in caught.value.message  # never echo a secret, even a fake one


def test_empty_secret_is_refused_in_prod(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NARTHEX_DEMO_ENV", "prod")
    monkeypatch.setenv("NARTHEX_DEMO_API_SECRET", "   ")
    with pytest.raises(SettingsError, match="NARTHEX_DEMO_API_SECRET"):
        load_settings(DemoSettings)


def test_real_secret_is_accepted_in_prod(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NARTHEX_DEMO_ENV", "prod")
    monkeypatch.setenv("NARTHEX_DEMO_API_SECRET", "k9$Qm2!vX7pL0zR4")
    settings = load_settings(DemoSettings)
    assert settings.api_secret.get_secret_value() == "k9$Qm2!vX7pL0zR4"
    assert "k9$Qm2" not in repr(settings)


def test_settings_are_frozen() -> None:
    settings = load_settings(DemoSettings)
    with pytest.raises(ValueError, match="frozen"):
        settings.port = 1  # type: ignore[misc]
