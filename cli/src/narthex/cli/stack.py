"""The local stack `narthex up` runs: its five services, their ports and URLs, and the
environment each one is started with (everything `up` decides, in `service_env`)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from narthex.cli.models import models_dir
from narthex.cli.paths import analytics_database_url, auth_database_url, signing_keys_dir

# Port order (port_base + index) and URL order; the gateway is first here but started last.
SERVICES: tuple[str, ...] = ("gateway", "auth", "features", "inference", "analytics")
UPSTREAMS: tuple[str, ...] = SERVICES[1:]
# The services that use Redis when the stack has one: limits, the online store, events.
REDIS_USERS: tuple[str, ...] = ("gateway", "features", "inference", "analytics")


def plan_ports(port_base: int) -> dict[str, int]:
    return {name: port_base + index for index, name in enumerate(SERVICES)}


def redis_port(port_base: int) -> int:
    """The local redis-server's port, right after the services'."""
    return port_base + len(SERVICES)


def connect_host(host: str) -> str:
    """Where a client reaches a server bound to `host` (wildcards mean this machine)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def service_url(host: str, port: int) -> str:
    return f"http://{connect_host(host)}:{port}"


def port_in_use(host: str, port: int) -> bool:
    """Whether binding `host:port` fails the way the service's own bind would."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror:
        return False  # the service will report the bad host itself
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # uvicorn sets SO_REUSEADDR too: a port in TIME_WAIT is free for it, so for us.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError:
            return True
    return False


def _shared_redis(env: dict[str, str], prefix: str, redis_url: str | None) -> None:
    url = redis_url or os.environ.get("REDIS_URL")
    if url and f"{prefix}REDIS_URL" not in os.environ:  # a per-service setting wins
        env[f"{prefix}REDIS_URL"] = url


def service_env(
    service: str,
    host: str,
    ports: dict[str, int],
    state_dir: Path,
    inference_key: str | None = None,
    redis_url: str | None = None,
) -> dict[str, str]:
    """The child's environment: the caller's, with everything `up` decides set explicitly.

    `inference_key`: the inference service's own API key (this run's), which it exchanges
    at auth for the token it reads features with. `redis_url`: the stack's Redis (the
    operator's REDIS_URL, or the redis-server `up` started); without one, the gateway's
    limits and the online store are in process and usage analytics is off."""
    prefix = f"NARTHEX_{service.upper()}_"
    env = dict(os.environ)
    env.update(
        {
            f"{prefix}HOST": host,
            f"{prefix}PORT": str(ports[service]),
            f"{prefix}ENV": "dev",
            f"{prefix}LOG_JSON": "true",
            # Log lines reach the file as they happen, not when a buffer fills.
            "PYTHONUNBUFFERED": "1",
        }
    )
    if service == "gateway":
        for upstream in UPSTREAMS:
            env[f"{prefix}{upstream.upper()}_URL"] = service_url(host, ports[upstream])
        # Shared limits and usage events when the stack has a Redis; in-process limits
        # otherwise, which are exact for this single-gateway stack.
        _shared_redis(env, prefix, redis_url)
    if service not in ("gateway", "auth"):
        # Internal services verify callers' tokens against this auth's JWKS themselves.
        env[f"{prefix}AUTH_URL"] = service_url(host, ports["auth"])
    if service == "features":
        # The online store in Redis when the stack has one; in process otherwise.
        _shared_redis(env, prefix, redis_url)
    if service == "inference":
        env[f"{prefix}MODEL_REPOSITORY"] = str(models_dir(state_dir))
        env[f"{prefix}FEATURES_URL"] = service_url(host, ports["features"])
        if inference_key is not None:
            env[f"{prefix}SERVICE_KEY"] = inference_key
        _shared_redis(env, prefix, redis_url)  # prediction events, for drift
    if service == "analytics":
        env[f"{prefix}DATABASE_URL"] = analytics_database_url(state_dir)
        env[f"{prefix}MODEL_REPOSITORY"] = str(models_dir(state_dir))
        _shared_redis(env, prefix, redis_url)
    if service == "auth":
        # In the state directory, not the caller's env or working directory: each
        # --state-dir is a platform of its own, tenants and keys included.
        env[f"{prefix}DATABASE_URL"] = auth_database_url(state_dir)
        env[f"{prefix}SIGNING_KEYS_DIR"] = str(signing_keys_dir(state_dir))
    return env
