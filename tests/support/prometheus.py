"""A real Prometheus (Debian's binary) for tests: a generated config, a private storage
directory, a free loopback port; started and stopped through `platform.running`."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import orjson

from tests.support.databases import service_unavailable
from tests.support.platform import HOST, Spec, running
from tests.support.services import Service

__all__ = ["Target", "prometheus", "query", "wait_for"]

# Scrape often: the tests wait for scrapes by polling, never by sleeping a fixed time.
SCRAPE_INTERVAL = "1s"

Target = tuple[str, Mapping[str, str]]  # (http://host:port, labels)


def _binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        service_unavailable("prometheus is not installed (apt-get install prometheus)")
    return found


@contextmanager
def prometheus(
    targets: Sequence[Target], directory: Path, job: str = "narthex"
) -> Iterator[Service]:
    """Prometheus scraping each target's /metrics with its labels, stopped on exit."""
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": [
            {
                "job_name": job,
                "metrics_path": "/metrics",
                "static_configs": [
                    {"targets": [url.removeprefix("http://")], "labels": dict(labels)}
                    for url, labels in targets
                ],
            }
        ],
    }
    directory.mkdir(parents=True, exist_ok=True)
    config_file = directory / "prometheus.yml"
    config_file.write_bytes(orjson.dumps(config))  # JSON is YAML
    spec = Spec(
        "prometheus",
        (
            _binary(),
            f"--config.file={config_file}",
            f"--storage.tsdb.path={directory / 'data'}",
            "--storage.tsdb.retention.time=1h",
            f"--web.listen-address={HOST}:{{port}}",
        ),
        ready_path="/-/ready",
    )
    with running([spec], directory) as (server,):
        yield server


def query(server: Service | str, promql: str) -> float | None:
    """One instant query's single value (None for an empty answer); `server` or its URL."""
    url = server if isinstance(server, str) else server.url
    response = httpx.get(url + "/api/v1/query", params={"query": promql}, timeout=5.0)
    response.raise_for_status()
    result = response.json()["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def wait_for(server: Service | str, promql: str, at_least: float, timeout: float = 30.0) -> float:
    """Poll until `promql` reaches `at_least` (Prometheus has scraped what was sent)."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = query(server, promql)
        if value is not None and value >= at_least:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"{promql} = {value}, waited for {at_least}")
