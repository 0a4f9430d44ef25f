"""Each service against its own OpenAPI: generated requests, real processes, real tokens.

schemathesis reads a running service's `/openapi.json` and sends requests generated from
it: no answer may be a 5xx, and every answer must be one the description lists, with the
content type and body it says. The five services run as real processes (the tests/support
launchers), and the callers carry real tokens: auth signs with the test key of
tests/support/tokens.py and publishes it, so every service's token check accepts them and
the requests reach the routes behind it.

Examples are bounded and derandomized: the same requests on every run, a few per operation,
so that the whole module stays well within three minutes on a small, busy machine.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from narthex.common import scopes
from narthex.transactions.lookup import BATCH_GET
from tests.support.models import builtin_repository
from tests.support.platform import KEY_PEPPER, Spec, bootstrap, module_argv, running
from tests.support.services import free_port
from tests.support.tokens import KEY, token

# Starting five services on a busy two-core machine is most of the time this module takes.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SERVICES = ("gateway", "auth", "features", "inference", "analytics")
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# Per operation: enough to walk every parameter's kinds, few enough for the time budget.
EXAMPLES = 12
# Path parameters naming what is there: the model the inference service serves.
KNOWN = {"name": "fraud", "version": "1"}
# Small, so that the cap is quick to cross (the default is 1 MiB).
BODY_CAP = 64 << 10
# Operations only a platform service may call (inference reading features).
SERVICE_PATHS = frozenset({BATCH_GET})


@dataclass(frozen=True)
class Platform:
    urls: dict[str, str]
    admin: str  # a token of the operator tenant: admin role, every tenant scope
    service: str  # a token of a platform service (features lookups)

    def headers_for(self, path: str) -> dict[str, str]:
        held = self.service if path in SERVICE_PATHS else self.admin
        return {"Authorization": f"Bearer {held}"}


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    directory = tmp_path_factory.mktemp("contract")
    keys = directory / "keys"
    keys.mkdir(mode=0o700)
    # auth signs with the tests' key and publishes it: tokens.token() is then a real token.
    (keys / "current.pem").write_bytes(KEY.to_pem())
    database_url = f"sqlite+aiosqlite:///{directory / 'auth.db'}"
    operator, _ = asyncio.run(bootstrap(database_url, keys))
    ports = {name: free_port() for name in SERVICES}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    env = {
        "auth": {
            "NARTHEX_AUTH_DATABASE_URL": database_url,
            "NARTHEX_AUTH_SIGNING_KEYS_DIR": str(keys),
            "NARTHEX_AUTH_KEY_PEPPER": KEY_PEPPER,
        },
        "features": {"NARTHEX_FEATURES_AUTH_URL": urls["auth"]},
        "analytics": {"NARTHEX_ANALYTICS_AUTH_URL": urls["auth"]},
        "inference": {
            "NARTHEX_INFERENCE_AUTH_URL": urls["auth"],
            "NARTHEX_INFERENCE_FEATURES_URL": urls["features"],
            "NARTHEX_INFERENCE_MODEL_REPOSITORY": str(builtin_repository(["fraud"])),
            "NARTHEX_INFERENCE_MODELS": "fraud",
        },
        "gateway": {
            f"NARTHEX_GATEWAY_{name.upper()}_URL": url
            for name, url in urls.items()
            if name != "gateway"
        },
    }
    specs = [
        Spec(
            name,
            module_argv(f"narthex.{name}"),
            {
                f"NARTHEX_{name.upper()}_HOST": "127.0.0.1",
                f"NARTHEX_{name.upper()}_PORT": "{port}",
                f"NARTHEX_{name.upper()}_ENV": "dev",  # as `narthex up` runs them
                f"NARTHEX_{name.upper()}_MAX_BODY_BYTES": str(BODY_CAP),
                **env[name],
            },
            port=ports[name],
        )
        for name in SERVICES
    ]
    # All at once: each is told the others' URLs, and none needs another to start.
    with running(specs, directory, timeout=150.0):
        yield Platform(
            urls,
            admin=token(
                [scopes.ADMIN, scopes.TENANT], sorted(scopes.scopes_for({scopes.ADMIN})), operator
            ),
            service=token([scopes.SERVICE], sorted(scopes.SERVICE_SCOPES), "service-inference"),
        )


def exercise(
    operation: APIOperation[Any, Any, Any, Any],
    url: str,
    headers: dict[str, str],
    statuses: Counter[int],
) -> None:
    """Send the operation's bounded examples, counting their statuses; the first failing
    check raises."""
    # Valid requests, which must be served or refused as described, and invalid ones,
    # which must be refused as described: never a 5xx either way.
    strategies = [
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    ]
    # Random names find nothing; a model that is there takes requests past the lookup.
    named = {p.name for p in operation.path_parameters} & set(KNOWN)
    if named and not operation.path.startswith("/v1/admin/"):  # never unload what serves
        known = {name: KNOWN[name] for name in named}
        strategies.append(operation.as_strategy(GenerationMode.POSITIVE, path_parameters=known))
    cases = st.one_of(strategies)

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        verbosity=Verbosity.quiet,
    )
    @given(case=cases)
    def call(case: Case[Any]) -> None:
        response = case.call(base_url=url, headers=headers, timeout=10)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=CHECKS, headers=headers)

    call()


@pytest.mark.parametrize("service", SERVICES)
def test_a_body_over_the_cap_is_413_on_every_service(platform: Platform, service: str) -> None:
    response = httpx.post(
        f"{platform.urls[service]}/v1/anything",
        content=b"x" * (BODY_CAP + 1),
        headers={**platform.headers_for(""), "Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413, response.text
    assert response.json()["type"].endswith("/payload-too-large")


@pytest.mark.parametrize("service", SERVICES)
def test_every_answer_is_described_and_none_is_a_server_error(
    platform: Platform, service: str
) -> None:
    url = platform.urls[service]
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    failures: list[str] = []
    operations = 0
    statuses: Counter[int] = Counter()
    for result in schema.get_all_operations():
        if not isinstance(result, Ok):
            failures.append(f"an operation cannot be read: {result.err()}")
            continue
        operation = result.ok()
        operations += 1
        try:
            exercise(operation, url, platform.headers_for(operation.path), statuses)
        except (Exception, FailureGroup) as exc:  # every operation's failures, not the first's
            failures.append(f"{operation.label}: {exc}")
    assert operations > 0
    # The tokens got the requests past the token check: routes answered, not just refused.
    assert sum(n for status, n in statuses.items() if status < 300) > statuses[401], statuses
    assert not failures, "\n\n".join(failures)
