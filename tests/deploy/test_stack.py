"""End to end in containers (`make test-containers`, not `make test`: it builds every image):
build with deploy/compose/build.sh, bring docker-compose.yml up under a project of its own,
wait for health, send the README's curl lines through the containerised gateway (an embedding,
a transaction, a fraud score), see Prometheus scrape every service, stop the gateway and see it
drain and exit 0, tear everything down. Prints the image sizes, the build and start-up times.

Base images: the Dockerfiles' defaults (Docker Hub), or BASE_IMAGE / UV_IMAGE /
INFRA_BASE_IMAGE from the environment (`make test-containers LOCAL_BASE=1` makes and names
debootstrapped ones)."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.databases import service_unavailable
from tests.support.services import free_port

pytestmark = [pytest.mark.containers, pytest.mark.timeout(3600)]

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("gateway", "auth", "features", "inference", "analytics")
JOBS = {*SERVICES, "prometheus"}
# Up and healthy within this (a cold start loads minilm); polled, never slept through.
START_TIMEOUT_S = 300.0
POLL_S = 1.0
SECRETS = (
    "NARTHEX_AUTH_KEY_PEPPER",
    "REDIS_PASSWORD",
    "POSTGRES_PASSWORD",
    "AUTH_DB_PASSWORD",
    "ANALYTICS_DB_PASSWORD",
    "GRAFANA_ADMIN_PASSWORD",
)


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        service_unavailable(f"{name} is not installed (apt-get install docker.io docker-compose)")
    return found


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False, cwd=ROOT)
    assert result.returncode == 0, f"{' '.join(argv)}:\n{result.stdout}\n{result.stderr}"
    return result


@dataclass
class Stack:
    compose: list[str]
    gateway: str
    prometheus: str

    def __call__(self, *args: str) -> str:
        return _run([*self.compose, *args]).stdout


@pytest.fixture(scope="module")
def built() -> tuple[str, str]:
    """Every image, built now: (tag, build.sh's report)."""
    docker = _tool("docker")
    _tool("docker-compose")
    if subprocess.run([docker, "info"], capture_output=True, check=False).returncode != 0:
        service_unavailable("no Docker daemon answers (start dockerd)")
    started = time.monotonic()
    output = _run([str(ROOT / "deploy/compose/build.sh")]).stdout
    took = time.monotonic() - started
    tag = output.strip().splitlines()[-1].removeprefix("NARTHEX_TAG=")
    print(f"\nbuilt in {took:.0f} s (image, seconds, size):\n{output}")
    return tag, output


@pytest.fixture(scope="module")
def stack(built: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tag, _ = built
    directory = tmp_path_factory.mktemp("compose")
    ports = {"GATEWAY_PORT": free_port(), "PROMETHEUS_PORT": free_port()}
    env = {name: secrets.token_hex(16) for name in SECRETS} | {"NARTHEX_TAG": tag} | ports
    env_file = directory / "test.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    project = f"narthex-e2e-{secrets.token_hex(4)}"
    compose = [
        _tool("docker-compose"),
        *("--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yml")),
        *("--env-file", str(env_file), "-p", project),
    ]
    stack = Stack(
        compose,
        f"http://127.0.0.1:{ports['GATEWAY_PORT']}",
        f"http://127.0.0.1:{ports['PROMETHEUS_PORT']}",
    )
    try:
        started = time.monotonic()
        stack("up", "-d")
        _wait_healthy(stack)
        print(
            f"\nstack up and every container healthy {time.monotonic() - started:.0f} s after `up`"
        )
        yield stack
    finally:
        subprocess.run(
            [*compose, "down", "-v", "--remove-orphans"], capture_output=True, check=False
        )


def _health(stack: Stack) -> dict[str, str]:
    ids = stack("ps", "-q").split()
    inspected = json.loads(_run(["docker", "inspect", *ids]).stdout) if ids else []
    return {
        item["Name"].lstrip("/"): (item["State"].get("Health") or {}).get(
            "Status", item["State"]["Status"]
        )
        for item in inspected
    }


def _wait_healthy(stack: Stack) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        health = _health(stack)
        running = {name: state for name, state in health.items() if "provision" not in name}
        if len(running) == len(SERVICES) + 3 and set(running.values()) == {"healthy"}:
            return
        assert time.monotonic() < deadline, f"not healthy after {START_TIMEOUT_S} s: {health}"
        time.sleep(POLL_S)


def _demo_key(stack: Stack) -> str:
    path = "/run/narthex/provision/demo.key"
    return stack("run", "--rm", "--no-deps", "-T", "--entrypoint", "cat", "provision", path).strip()


def test_the_readme_curl_lines_answer_through_the_gateway(stack: Stack) -> None:
    headers = {"Authorization": f"Bearer {_demo_key(stack)}"}
    with httpx.Client(base_url=stack.gateway, headers=headers, timeout=30.0) as client:
        embedding = client.post(
            "/v1/embeddings", json={"model": "minilm", "input": "hello narthex"}
        )
        assert embedding.status_code == 200, embedding.text
        assert len(embedding.json()["data"][0]["embedding"]) == 384
        event = {
            "event_id": "e1",
            "account_id": "acct_42",
            "merchant_id": "m_7",
            "amount": 129.9,
            "currency": "EUR",
            "timestamp": 1795500000,
            "channel": "online",
        }
        ingested = client.post("/v1/events/transactions", json={"events": [event]})
        assert ingested.json() == {"accepted": 1, "duplicates": 0, "stale": 0}, ingested.text
        instance = {
            "account_id": "acct_42",
            "merchant_id": "m_9",
            "amount": 980,
            "currency": "EUR",
            "channel": "online",
        }
        scored = client.post("/v1/models/fraud/predict", json={"instances": [instance]})
        assert scored.status_code == 200, scored.text
        (prediction,) = scored.json()["predictions"]
        assert prediction["degraded"] is False  # features answered: the account's aggregates
        assert 0.0 <= prediction["probabilities"][1] <= 1.0
        # No key, no answer: the containerised gateway still guards the door.
        assert client.get("/v1/keys", headers={"Authorization": ""}).status_code == 401


def test_prometheus_sees_every_service_up(stack: Stack) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    with httpx.Client(base_url=stack.prometheus, timeout=10.0) as client:
        while True:
            targets = client.get("/api/v1/targets", params={"state": "active"}).json()
            health = {t["labels"]["job"]: t["health"] for t in targets["data"]["activeTargets"]}
            if set(health) == JOBS and set(health.values()) == {"up"}:
                break
            assert time.monotonic() < deadline, health
            time.sleep(POLL_S)


def test_the_images_say_what_they_carry(stack: Stack, built: tuple[str, str]) -> None:
    tag, _ = built
    commit = _run(["git", "rev-parse", "HEAD"]).stdout.strip()
    for service in SERVICES:
        (image,) = json.loads(
            _run(["docker", "image", "inspect", f"narthex/{service}:{tag}"]).stdout
        )
        config = image["Config"]
        assert config["User"] == "10001:10001", service
        assert config["Healthcheck"]["Test"][0] == "CMD", service
        assert config["Labels"]["org.opencontainers.image.revision"] == commit, service
        assert config["Labels"]["org.opencontainers.image.version"] == tag, service
    (inference,) = json.loads(
        _run(["docker", "image", "inspect", f"narthex/inference:{tag}"]).stdout
    )
    labels = inference["Config"]["Labels"]
    for metadata_file in sorted((ROOT / ".state/models").glob("*/*/metadata.json")):
        metadata = json.loads(metadata_file.read_text())
        label = f"dev.narthex.model.{metadata['name']}.v{metadata['version']}.sha256"
        assert labels.get(label) == metadata["sha256"], label


def test_analytics_finds_each_versions_baseline_and_carries_no_model(stack: Stack) -> None:
    """Drift compares scores with each version's score_baseline: the running analytics
    container reads them through its own settings, and holds metadata.json files only."""
    models = ROOT / ".state/models"
    files = stack("exec", "-T", "analytics", "find", "/opt/narthex/models", "-type", "f").split()
    assert sorted(files) == sorted(
        f"/opt/narthex/models/{path.relative_to(models)}"
        for path in models.glob("*/*/metadata.json")
    )
    check = (
        "from narthex.analytics.service import baseline_of;"
        "from narthex.analytics.settings import AnalyticsSettings;"
        "r = AnalyticsSettings().model_repository;"
        "print(*(baseline_of(r, 'fraud', v) is not None for v in '12'))"
    )
    assert stack("exec", "-T", "analytics", "python", "-c", check).split() == ["True", "True"]


def test_the_gateway_drains_and_exits_cleanly_on_stop(stack: Stack) -> None:
    (container,) = stack("ps", "-q", "gateway").split()
    stack("stop", "gateway")
    state = json.loads(_run(["docker", "inspect", container]).stdout)[0]["State"]
    # 0: SIGTERM reached uvicorn (PID 1), which drained and shut down within the grace
    # period; 137 would be the SIGKILL after it.
    assert (state["Status"], state["ExitCode"]) == ("exited", 0)
    logs = stack("logs", "--no-color", "gateway")
    assert "Application shutdown complete" in logs
    stack("start", "gateway")


def test_secrets_never_reach_an_image(stack: Stack, built: tuple[str, str]) -> None:
    tag, _ = built
    # This run's secrets, and a developer's own .env if there is one: none may be in a layer
    # or the image's config (the build context is an allowlist without .env).
    values: list[str] = []
    env_files = [Path(stack.compose[stack.compose.index("--env-file") + 1]), ROOT / ".env"]
    for env_file in filter(Path.is_file, env_files):
        for line in env_file.read_text().splitlines():
            key, _, value = line.partition("=")
            if key in SECRETS and value:
                values.append(value)
    assert values
    for service in SERVICES:
        image = f"narthex/{service}:{tag}"
        history = _run(["docker", "history", "--no-trunc", image]).stdout
        config = _run(["docker", "image", "inspect", image]).stdout
        for value in values:
            assert value not in history + config, service
        # The keys provision writes live in a volume, never in the image.
        files = _run(
            [
                "docker",
                "run",
                "--rm",
                "--entrypoint",
                "ls",
                image,
                "-A",
                "/run/narthex/provision",
                "/var/lib/narthex/keys",
            ]
        ).stdout
        assert files.split() == ["/run/narthex/provision:", "/var/lib/narthex/keys:"], service
