"""docker-compose.yml: valid against the Compose Specification schema and to Debian's
docker-compose, secrets only from the env file, every image pinned, every service health-gated
and scraped, the upstream-image services behind a profile."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from tests.support.databases import service_unavailable

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = ROOT / "deploy/compose/schemas/compose-spec.json"
ENV_EXAMPLE = ROOT / ".env.example"
PROMETHEUS = ROOT / "deploy/compose/prometheus.yml"

# narthex's own services (each answers /healthz and /metrics) and their ports.
SERVICES = {"gateway": 8000, "auth": 8001, "features": 8002, "inference": 8003, "analytics": 8004}
# Built by deploy/compose/build.sh from Debian packages.
INFRA = {"redis", "postgres", "prometheus"}
# No Debian package: upstream images, behind a profile the local run leaves out.
UPSTREAM = {"otel-collector", "jaeger", "grafana"}
SECRETS = {
    "NARTHEX_AUTH_KEY_PEPPER",
    "REDIS_PASSWORD",
    "POSTGRES_PASSWORD",
    "AUTH_DB_PASSWORD",
    "ANALYTICS_DB_PASSWORD",
    "GRAFANA_ADMIN_PASSWORD",
}
VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}")


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return document


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def test_the_file_is_valid_against_the_compose_specification() -> None:
    schema = json.loads(SCHEMA.read_text())
    errors = [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in Draft202012Validator(schema).iter_errors(compose())
    ]
    assert errors == []


def test_the_schema_check_catches_a_broken_file() -> None:
    schema = json.loads(SCHEMA.read_text())
    broken = compose()
    broken["services"]["gateway"]["depends_on"]["auth"]["condition"] = "service_ready"
    broken["services"]["redis"]["ports"] = {"6379": 6379}
    assert len(list(Draft202012Validator(schema).iter_errors(broken))) >= 2


def test_every_service_of_the_stack_is_there() -> None:
    assert set(services()) == {*SERVICES, *INFRA, *UPSTREAM, "provision", "inference-gpu"}


def test_images_are_pinned_never_latest() -> None:
    for name, service in services().items():
        image = service["image"]
        if name in UPSTREAM:
            assert re.fullmatch(r"[a-z/-]+:\d+\.\d+\.\d+", image), f"{name}: {image}"
        else:
            # The tag build.sh printed (commit-based); required, so never an implicit latest.
            # provision runs the auth image (narthex.cli.provision ships in it).
            assert image.startswith(f"narthex/{'auth' if name == 'provision' else name}:")
            assert re.fullmatch(r"narthex/[a-z-]+:\$\{NARTHEX_TAG:\?[^}]*\}", image), name


def test_upstream_images_and_the_gpu_build_are_behind_profiles() -> None:
    for name, service in services().items():
        expected = (
            ["upstream"] if name in UPSTREAM else ["gpu"] if name == "inference-gpu" else None
        )
        assert service.get("profiles") == expected, name


def test_every_dependency_waits_for_health_or_completion() -> None:
    stack = services()
    for name, service in stack.items():
        if name in UPSTREAM:
            continue  # upstream images carry no healthcheck of ours
        for dependency, rule in (service.get("depends_on") or {}).items():
            expected = (
                "service_completed_successfully" if dependency == "provision" else "service_healthy"
            )
            assert rule == {"condition": expected}, f"{name} -> {dependency}"
    # The gateway starts last: after every upstream it proxies to.
    assert set(stack["gateway"]["depends_on"]) >= set(SERVICES) - {"gateway"}
    assert stack["redis"]["volumes"] == ["redis-data:/data"]


def test_secrets_come_only_from_the_env_file() -> None:
    text = COMPOSE.read_text()
    for secret in SECRETS:
        # Required (`:?`): a stack never starts on an empty or default secret.
        uses = re.findall(rf"\$\{{{secret}(:?[-?])", text)
        assert uses, f"{secret} is not used"
        assert set(uses) == {":?"}, f"{secret} has a default"
    for service in services().values():
        environment = service.get("environment") or {}
        for key, value in environment.items():
            if re.search(r"PASSWORD|PEPPER|SECRET|TOKEN|_KEY$", key):
                assert str(value).startswith("${"), key


def test_the_env_example_names_every_variable_and_holds_no_secret() -> None:
    used = set(VARIABLE.findall(COMPOSE.read_text()))
    example: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.lstrip("# ")
        if re.fullmatch(r"[A-Z0-9_]+=.*", line):
            key, _, value = line.partition("=")
            example[key] = value
    assert used <= set(example), used - set(example)
    for secret in SECRETS:
        assert example[secret] == "", secret
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert ".env" in ignored


def test_prometheus_scrapes_every_service_by_its_compose_name() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {
        job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
        for job in config["scrape_configs"]
    }
    assert {name: jobs.get(name) for name in SERVICES} == {
        name: [f"{name}:{port}"] for name, port in SERVICES.items()
    }
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    mounts = services()["prometheus"]["volumes"]
    assert "./observability/prometheus/rules:/etc/prometheus/rules:ro" in mounts


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        service_unavailable("promtool is not installed (apt-get install prometheus)")
    # The rule glob matches nothing outside the container: the syntax is what is checked.
    result = subprocess.run(
        [promtool, "check", "config", "--syntax-only", str(PROMETHEUS)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _docker_compose_config(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        service_unavailable("docker-compose is not installed (apt-get install docker-compose)")
    env_file = tmp_path / "test.env"
    env_file.write_text("".join(f"{key}={value}\n" for key, value in env.items()))
    argv = [binary, "--project-directory", str(ROOT), "-f", str(COMPOSE)]
    return subprocess.run(
        [*argv, "--env-file", str(env_file), "config"],
        capture_output=True,
        text=True,
        check=False,
        # Only the env file speaks: not the caller's environment, nor a developer's .env.
        env={"PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
    )


def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    env = {secret: f"s3cret{index}" for index, secret in enumerate(sorted(SECRETS))}
    result = _docker_compose_config({**env, "NARTHEX_TAG": "0123456789ab"}, tmp_path)
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    gateway = rendered["services"]["gateway"]
    assert gateway["image"] == "narthex/gateway:0123456789ab"
    assert gateway["read_only"] is True


@pytest.mark.parametrize("missing", ["NARTHEX_TAG", "NARTHEX_AUTH_KEY_PEPPER", "REDIS_PASSWORD"])
def test_docker_compose_refuses_a_missing_setting(missing: str, tmp_path: Path) -> None:
    env = dict.fromkeys(SECRETS, "x") | {"NARTHEX_TAG": "0123456789ab"}
    del env[missing]
    result = _docker_compose_config(env, tmp_path)
    assert result.returncode != 0
    assert missing in result.stderr
