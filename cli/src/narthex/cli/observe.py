"""`narthex up --observe`: Debian's prometheus beside the local stack, with the project's
config (observability/prometheus/local.yml) and rules, scraping this run's ports."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from narthex.cli.stack import SERVICES, connect_host

__all__ = [
    "LISTEN_HOST",
    "ObserveError",
    "find_observability",
    "find_prometheus",
    "prometheus_argv",
    "prometheus_port",
    "render_config",
]

LOCAL_CONFIG = Path("prometheus") / "local.yml"
# Prometheus has no authentication: it listens on loopback whatever --host the services get.
LISTEN_HOST = "127.0.0.1"
# Enough for an afternoon's dashboards; the state directory is not a metrics archive.
RETENTION = "2d"
STATE_SUBDIR = "prometheus"
INSTALL_HINT = "apt-get install prometheus"


class ObserveError(Exception):
    """--observe cannot start: says what is missing and how to get it."""


def prometheus_port(port_base: int) -> int:
    """Two after the five services' ports (the one right after them is the local
    redis-server's, `stack.redis_port`)."""
    return port_base + len(SERVICES) + 1


def find_prometheus() -> str:
    found = shutil.which("prometheus")
    if found is None:
        raise ObserveError(
            f"--observe runs Debian's prometheus, which is not installed ({INSTALL_HINT},"
            " or put a prometheus binary on PATH)"
        )
    return found


def find_observability(start: Path | None = None) -> Path:
    """observability/ in the working directory or the nearest folder above it, else in the
    checkout this package was installed from (an editable install, as `make install` does)."""
    here = (start or Path.cwd()).resolve()
    candidates = [folder / "observability" for folder in (here, *here.parents)]
    candidates.append(Path(__file__).resolve().parents[4] / "observability")
    for candidate in candidates:
        if (candidate / LOCAL_CONFIG).is_file():
            return candidate
    raise ObserveError(
        f"--observe needs the project's observability/{LOCAL_CONFIG}: run it from the"
        " narthex checkout"
    )


def render_config(observability: Path, host: str, ports: Mapping[str, int]) -> dict[str, Any]:
    """local.yml for this run: each service's job scrapes its port here, and the rule files
    are absolute (the written config lives in the state directory, not beside them)."""
    template = observability / LOCAL_CONFIG
    config: dict[str, Any] = yaml.safe_load(template.read_text())
    config["rule_files"] = [
        str((template.parent / pattern).resolve()) for pattern in config.get("rule_files", [])
    ]
    target_host = connect_host(host)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    missing = sorted(set(ports) - set(jobs))
    if missing:
        raise ObserveError(f"{template} has no scrape job for {', '.join(missing)}")
    for name, port in ports.items():
        jobs[name]["static_configs"] = [{"targets": [f"{target_host}:{port}"]}]
    return config


def prometheus_argv(
    binary: str, state_dir: Path, config: Mapping[str, Any], port: int
) -> list[str]:
    """Writes this run's config under the state directory; the command line that serves it."""
    directory = state_dir.resolve() / STATE_SUBDIR
    directory.mkdir(parents=True, exist_ok=True)
    config_file = directory / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    return [
        binary,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={directory / 'data'}",
        f"--storage.tsdb.retention.time={RETENTION}",
        f"--web.listen-address={LISTEN_HOST}:{port}",
    ]
