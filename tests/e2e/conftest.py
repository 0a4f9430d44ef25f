"""End-to-end fixtures: a real auth + inference + gateway platform, once per database backend."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.databases import BACKENDS, Backend, throwaway_database
from tests.support.platform import KEY_PEPPER, bootstrap, provision_inference
from tests.support.services import Service, run_service

TOKEN_TTL_SECONDS = 900
# How often the gateway fetches revoked keys and disabled tenants: short, so the tests
# that wait for a poll are quick (they wait for the poll itself, never for a time).
REVOCATION_POLL_SECONDS = 0.5
# How long the gateway keeps the JWKS it serves (one fetch per period, whatever the load).
PUBLIC_CACHE_SECONDS = 1.0


@dataclass(frozen=True)
class Platform:
    backend: Backend
    auth: Service
    inference: Service
    gateway: Service
    signing_keys_dir: Path
    admin_tenant_id: str
    admin_key: str


@pytest.fixture(scope="module", params=BACKENDS, ids=BACKENDS)
def platform(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Platform]:
    """auth, inference (a representative internal upstream) and the gateway, started once
    per backend for the whole module; the database is dropped afterwards."""
    backend: Backend = request.param
    directory = tmp_path_factory.mktemp(f"platform-{backend}")
    keys_dir = directory / "keys"
    # One event loop for the database's whole life: created, used and dropped in it.
    with asyncio.Runner() as runner, ExitStack() as stack:
        database = throwaway_database(backend, directory)
        database_url = runner.run(database.__aenter__())
        stack.callback(lambda: runner.run(database.__aexit__(None, None, None)))
        tenant_id, admin_key = runner.run(bootstrap(database_url, keys_dir))
        inference_key = runner.run(provision_inference(database_url, keys_dir))

        auth = stack.enter_context(
            run_service(
                "auth",
                directory,
                {
                    "NARTHEX_AUTH_ENV": "dev",
                    "NARTHEX_AUTH_DATABASE_URL": database_url,
                    "NARTHEX_AUTH_SIGNING_KEYS_DIR": str(keys_dir),
                    "NARTHEX_AUTH_KEY_PEPPER": KEY_PEPPER,
                    "NARTHEX_AUTH_TOKEN_TTL_SECONDS": str(TOKEN_TTL_SECONDS),
                    "NARTHEX_AUTH_KEY_ROTATION_GRACE_SECONDS": "3600",
                },
            )
        )
        inference = stack.enter_context(
            run_service(
                "inference",
                directory,
                {
                    "NARTHEX_INFERENCE_AUTH_URL": auth.url,
                    # No models: only its token checks are under test here.
                    "NARTHEX_INFERENCE_MODEL_REPOSITORY": str(directory / "models"),
                    # Its own identity, as `narthex up` gives it one.
                    "NARTHEX_INFERENCE_SERVICE_KEY": inference_key,
                },
            )
        )
        gateway = stack.enter_context(
            run_service(
                "gateway",
                directory,
                {
                    "NARTHEX_GATEWAY_AUTH_URL": auth.url,
                    "NARTHEX_GATEWAY_INFERENCE_URL": inference.url,
                    # Not under test here; any ready service keeps the gateway's readiness green.
                    "NARTHEX_GATEWAY_FEATURES_URL": inference.url,
                    "NARTHEX_GATEWAY_ANALYTICS_URL": inference.url,
                    "NARTHEX_GATEWAY_API_KEY_REVALIDATE_SECONDS": "2",
                    "NARTHEX_GATEWAY_JWKS_UNKNOWN_KID_COOLDOWN": "30",
                    "NARTHEX_GATEWAY_REVOCATION_POLL_SECONDS": str(REVOCATION_POLL_SECONDS),
                    "NARTHEX_GATEWAY_PUBLIC_CACHE_SECONDS": str(PUBLIC_CACHE_SECONDS),
                    # Every tenant these tests make has its key exchanged on first use,
                    # from 127.0.0.1: the per-IP guard is not what they test.
                    "NARTHEX_GATEWAY_TOKEN_EXCHANGE_LIMIT": "600/minute",
                },
            )
        )
        yield Platform(
            backend=backend,
            auth=auth,
            inference=inference,
            gateway=gateway,
            signing_keys_dir=keys_dir,
            admin_tenant_id=tenant_id,
            admin_key=admin_key,
        )
