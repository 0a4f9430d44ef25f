"""Identity end to end: API keys, JWTs, JWKS and key rotation through real processes over HTTP.

One platform (auth, inference, gateway) per database backend serves the whole module.
Everything goes through the gateway unless a test says otherwise; every refusal must be
a 401/403 problem, never a 5xx.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import string
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from narthex.common.errors import protocol_of
from narthex.common.tokens import SigningKey
from narthex.testing.jwts import (
    b64url,
    b64url_decode,
    b64url_json,
    public_pem,
    rs256,
    unsigned,
    unverified,
)
from tests.e2e.conftest import PUBLIC_CACHE_SECONDS, TOKEN_TTL_SECONDS, Platform

pytestmark = pytest.mark.slow

ISSUER, AUDIENCE = "narthex-auth", "narthex"
ADMIN_ROUTE = "/v1/admin/tenants"
JWKS_PATH = "/.well-known/jwks.json"
PROBLEM_JSON = "application/problem+json"


# -- helpers ----------------------------------------------------------------------------------


def claims_for(sub: str, *, roles: list[str], scope: str, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": sub,
        "plan": "enterprise",
        "roles": roles,
        "scope": scope,
        "jti": secrets.token_urlsafe(16),
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    }
    claims.update(overrides)
    return claims


def admin_claims(platform: Platform, **overrides: Any) -> dict[str, Any]:
    return claims_for(
        platform.admin_tenant_id,
        roles=["admin"],
        scope="admin events inference keys usage",
        **overrides,
    )


def auth_signing_key(platform: Platform) -> SigningKey:
    """The auth service's real private key: forgeries with a valid signature, bad claims."""
    return SigningKey.from_pem((platform.signing_keys_dir / "current.pem").read_bytes())


def assert_refused(response: httpx.Response) -> None:
    """401 or 403 with the error body of the route's protocol (tests/e2e/
    test_error_protocols.py pins which is which); a 5xx (or anything else) fails."""
    assert response.status_code in (401, 403), (response.status_code, response.text)
    protocol = protocol_of(response.url.path)
    if protocol == "oip":
        assert response.headers["content-type"] == "application/json", response.headers
        assert isinstance(response.json()["error"], str)
        return
    if protocol == "openai":
        assert response.headers["content-type"] == "application/json", response.headers
        assert response.json()["error"]["type"] in ("authentication_error", "permission_error")
        return
    assert response.headers["content-type"].startswith(PROBLEM_JSON), response.headers
    body = response.json()
    assert body["status"] == response.status_code
    assert isinstance(body["type"], str)
    assert isinstance(body["title"], str)


def key_header(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def exchange(client: httpx.Client, key: str) -> str:
    """A JWT for `key` from the token endpoint (through the gateway)."""
    response = client.post("/v1/auth/token", headers=key_header(key))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "Bearer"
    token: str = body["access_token"]
    return token


def jwks_kids(client: httpx.Client) -> set[str]:
    response = client.get(JWKS_PATH)
    assert response.status_code == 200, response.text
    return {key["kid"] for key in response.json()["keys"]}


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()


@dataclass(frozen=True)
class Tenant:
    id: str
    key: str  # the full API key, secret included
    key_id: str


def new_tenant(admin: httpx.Client, prefix: str) -> Tenant:
    """A fresh `tenant`-role tenant with one key, made through the admin API."""
    name = f"{prefix}-{secrets.token_hex(4)}"
    response = admin.post(ADMIN_ROUTE, json={"name": name, "plan": "standard", "roles": ["tenant"]})
    assert response.status_code == 201, response.text
    tenant_id = response.json()["id"]
    response = admin.post(f"{ADMIN_ROUTE}/{tenant_id}/keys", json={"name": "first"})
    assert response.status_code == 201, response.text
    body = response.json()
    return Tenant(tenant_id, body["key"], body["id"])


def metric_total(text: str, name: str, route: str) -> float:
    """Sum of a counter's samples for one route across its other labels."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'route="{route}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def jwks_fetches_seen_by_auth(platform: Platform) -> float:
    response = httpx.get(platform.auth.url + "/metrics", timeout=5.0)
    assert response.status_code == 200
    return metric_total(response.text, "http_requests_total", JWKS_PATH)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def gateway(platform: Platform) -> Iterator[httpx.Client]:
    """A client of the gateway with no credentials of its own."""
    with httpx.Client(base_url=platform.gateway.url, timeout=10.0) as client:
        yield client


@pytest.fixture
def admin(platform: Platform) -> Iterator[httpx.Client]:
    """A client of the gateway that sends the operator's admin key."""
    with httpx.Client(
        base_url=platform.gateway.url, timeout=10.0, headers=key_header(platform.admin_key)
    ) as client:
        yield client


# -- happy paths ------------------------------------------------------------------------------


def test_admin_key_in_x_api_key_reaches_the_admin_api(
    platform: Platform, gateway: httpx.Client
) -> None:
    response = gateway.get(ADMIN_ROUTE, headers=key_header(platform.admin_key))
    assert response.status_code == 200, response.text
    assert platform.admin_tenant_id in {t["id"] for t in response.json()}


def test_admin_key_as_bearer_reaches_the_admin_api(
    platform: Platform, gateway: httpx.Client
) -> None:
    response = gateway.get(ADMIN_ROUTE, headers=bearer(platform.admin_key))
    assert response.status_code == 200, response.text
    assert platform.admin_tenant_id in {t["id"] for t in response.json()}


def test_jwt_from_the_token_endpoint_reaches_the_admin_api(
    platform: Platform, gateway: httpx.Client
) -> None:
    token = exchange(gateway, platform.admin_key)
    response = gateway.get(ADMIN_ROUTE, headers=bearer(token))
    assert response.status_code == 200, response.text
    assert platform.admin_tenant_id in {t["id"] for t in response.json()}


def test_oauth2_client_credentials_form_through_the_gateway(
    platform: Platform, gateway: httpx.Client
) -> None:
    key_id = platform.admin_key.split("_")[2]
    response = gateway.post(
        "/v1/auth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": key_id,
            "client_secret": platform.admin_key,
        },
    )
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == TOKEN_TTL_SECONDS
    assert gateway.get(ADMIN_ROUTE, headers=bearer(body["access_token"])).status_code == 200

    # The client id names the key: the right secret under another id is refused.
    response = gateway.post(
        "/v1/auth/token",
        data={
            "grant_type": "client_credentials",
            "client_id": "a" * 16,
            "client_secret": platform.admin_key,
        },
    )
    assert_refused(response)


def test_issued_token_carries_every_claim_and_a_published_kid(
    platform: Platform, gateway: httpx.Client
) -> None:
    header, claims = unverified(exchange(gateway, platform.admin_key))
    assert header["alg"] == "RS256"
    assert header["kid"] in jwks_kids(gateway)
    assert claims["iss"] == ISSUER
    assert claims["aud"] == AUDIENCE
    assert claims["sub"] == platform.admin_tenant_id
    assert claims["plan"] == "enterprise"
    assert claims["roles"] == ["admin"]
    assert "admin" in claims["scope"].split()
    assert isinstance(claims["jti"], str)
    assert len(claims["jti"]) >= 16
    assert claims["nbf"] == claims["iat"]
    assert claims["exp"] - claims["iat"] == TOKEN_TTL_SECONDS
    assert abs(claims["iat"] - time.time()) < 60


def test_tenant_has_several_active_keys_and_listings_never_show_a_secret(
    platform: Platform, admin: httpx.Client, gateway: httpx.Client
) -> None:
    tenant = new_tenant(admin, "two-keys")
    response = gateway.post("/v1/keys", headers=key_header(tenant.key), json={"name": "second"})
    assert response.status_code == 201, response.text
    created = response.json()
    second_key, second_id = created["key"], created["id"]
    assert second_key.startswith(created["prefix"] + "_")
    assert second_id != tenant.key_id

    listing = gateway.get("/v1/keys", headers=key_header(second_key))
    assert listing.status_code == 200, listing.text
    keys = {k["id"]: k for k in listing.json()}
    assert set(keys) == {tenant.key_id, second_id}
    for entry in keys.values():
        assert "key" not in entry
        assert entry["prefix"] == f"nx_{entry['prefix'].split('_')[1]}_{entry['id']}"
        assert entry["revoked_at"] is None
    # Neither secret appears anywhere in the listings (self-service or admin).
    admin_listing = admin.get(f"{ADMIN_ROUTE}/{tenant.id}/keys")
    assert admin_listing.status_code == 200
    for key in (tenant.key, second_key):
        secret = key.rsplit("_", 1)[1]
        assert secret not in listing.text
        assert secret not in admin_listing.text

    # Both keys work, side by side, both as X-API-Key and as a bearer.
    for key in (tenant.key, second_key):
        assert gateway.get("/v1/keys", headers=key_header(key)).status_code == 200
        assert gateway.get("/v1/keys", headers=bearer(key)).status_code == 200


def test_rotated_key_keeps_working_during_its_grace_and_the_new_one_works(
    admin: httpx.Client, gateway: httpx.Client
) -> None:
    tenant = new_tenant(admin, "rotate")
    response = gateway.post(f"/v1/keys/{tenant.key_id}/rotate", headers=key_header(tenant.key))
    assert response.status_code == 200, response.text
    body = response.json()
    new_key = body["new"]["key"]
    assert body["old"]["id"] == tenant.key_id
    assert body["old"]["replaced_by"] == body["new"]["id"]
    assert body["old"]["expires_at"] is not None  # the grace period ends it

    # The token endpoint asks the database every time: no cache hides the old key's state.
    exchange(gateway, tenant.key)
    exchange(gateway, new_key)
    for key in (tenant.key, new_key):
        response = gateway.get("/v1/keys", headers=key_header(key))
        assert response.status_code == 200, response.text


def test_audit_log_records_admin_and_self_service_actions(
    platform: Platform, admin: httpx.Client, gateway: httpx.Client
) -> None:
    tenant = new_tenant(admin, "audited")
    created = gateway.post("/v1/keys", headers=key_header(tenant.key), json={"name": "extra"})
    assert created.status_code == 201, created.text
    extra_id = created.json()["id"]
    rotated = gateway.post(f"/v1/keys/{tenant.key_id}/rotate", headers=key_header(tenant.key))
    assert rotated.status_code == 200, rotated.text
    new_id = rotated.json()["new"]["id"]
    revoked = gateway.delete(f"/v1/keys/{extra_id}", headers=key_header(tenant.key))
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["revoked_at"] is not None

    response = admin.get("/v1/admin/audit", params={"limit": 1000})
    assert response.status_code == 200, response.text
    entries = [(e["action"], e["target"], e["actor"], e["detail"]) for e in response.json()]
    seen = {(action, target, actor) for action, target, actor, _ in entries}
    assert ("tenant.create", tenant.id, platform.admin_tenant_id) in seen
    assert ("key.create", tenant.key_id, platform.admin_tenant_id) in seen
    assert ("key.create", extra_id, tenant.id) in seen
    assert ("key.rotate", tenant.key_id, tenant.id) in seen
    assert ("key.revoke", extra_id, tenant.id) in seen
    rotation = next(d for a, t, _, d in entries if a == "key.rotate" and t == tenant.key_id)
    assert rotation["new"] == new_id
    # The audit log is for admins only.
    assert_refused(gateway.get("/v1/admin/audit", headers=key_header(tenant.key)))


# -- forged and broken tokens -----------------------------------------------------------------


def alg_none(platform: Platform) -> str:
    return unsigned(admin_claims(platform), kid=auth_signing_key(platform).kid)


def hs256_with_the_public_key(platform: Platform) -> str:
    """The classic key-confusion attack: HMAC keyed with the RSA public key (as PEM)."""
    jwks = httpx.get(platform.gateway.url + JWKS_PATH, timeout=5.0).json()
    jwk = jwks["keys"][0]
    pem = public_pem(jwk)
    header = {"alg": "HS256", "typ": "JWT", "kid": jwk["kid"]}
    signing_input = f"{b64url_json(header)}.{b64url_json(admin_claims(platform))}"
    signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def expired(platform: Platform) -> str:
    now = int(time.time())
    claims = admin_claims(platform, iat=now - 1020, nbf=now - 1020, exp=now - 120)
    return rs256(auth_signing_key(platform), claims)


def not_yet_valid(platform: Platform) -> str:
    now = int(time.time())
    return rs256(auth_signing_key(platform), admin_claims(platform, nbf=now + 120))


def wrong_issuer(platform: Platform) -> str:
    return rs256(auth_signing_key(platform), admin_claims(platform, iss="https://evil.example"))


def wrong_audience(platform: Platform) -> str:
    return rs256(auth_signing_key(platform), admin_claims(platform, aud="someone-else"))


def unknown_kid(platform: Platform) -> str:
    return rs256(auth_signing_key(platform), admin_claims(platform), kid=secrets.token_hex(16))


def signed_by_another_key(platform: Platform) -> str:
    stranger = SigningKey.generate()
    return rs256(stranger, admin_claims(platform), kid=auth_signing_key(platform).kid)


def tampered_payload(platform: Platform) -> str:
    """A tenant's real token with its payload raised to admin; the signature is the original."""
    with httpx.Client(base_url=platform.gateway.url, timeout=10.0) as client:
        client.headers.update(key_header(platform.admin_key))
        tenant = new_tenant(client, "tamper")
        token = exchange(client, tenant.key)
    header, payload, signature = token.split(".")
    claims = json.loads(b64url_decode(payload))
    claims["sub"] = platform.admin_tenant_id
    claims["roles"] = ["admin"]
    claims["scope"] = "admin events inference keys usage"
    return f"{header}.{b64url_json(claims)}.{signature}"


FORGERIES: dict[str, Callable[[Platform], str]] = {
    "alg-none": alg_none,
    "hs256-keyed-with-rsa-public-key": hs256_with_the_public_key,
    "expired": expired,
    "not-yet-valid": not_yet_valid,
    "wrong-iss": wrong_issuer,
    "wrong-aud": wrong_audience,
    "unknown-kid": unknown_kid,
    "signed-by-another-key": signed_by_another_key,
    "tampered-payload": tampered_payload,
}


def test_a_token_forged_with_the_real_key_and_good_claims_is_accepted(
    platform: Platform, gateway: httpx.Client
) -> None:
    """The control for the forgeries below: only their one defect makes them fail."""
    token = rs256(auth_signing_key(platform), admin_claims(platform))
    response = gateway.get(ADMIN_ROUTE, headers=bearer(token))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("forge", FORGERIES.values(), ids=FORGERIES.keys())
def test_forged_or_invalid_token_is_refused(
    platform: Platform, gateway: httpx.Client, forge: Callable[[Platform], str]
) -> None:
    response = gateway.get(ADMIN_ROUTE, headers=bearer(forge(platform)))
    assert_refused(response)
    assert response.status_code == 401


# -- refused API keys -------------------------------------------------------------------------


def test_revoked_key_is_refused_within_seconds(admin: httpx.Client, gateway: httpx.Client) -> None:
    tenant = new_tenant(admin, "revoked")
    # Used first, so the gateway holds a cached token for it.
    assert gateway.get("/v1/keys", headers=key_header(tenant.key)).status_code == 200
    response = admin.delete(f"/v1/admin/keys/{tenant.key_id}")
    assert response.status_code == 200, response.text
    assert response.json()["revoked_at"] is not None

    assert_refused(gateway.post("/v1/auth/token", headers=key_header(tenant.key)))
    started = time.monotonic()
    refused = wait_until(
        lambda: gateway.get("/v1/keys", headers=key_header(tenant.key)).status_code == 401,
        timeout=5.0,
    )
    assert refused, "the gateway still accepts a revoked key after 5 s"
    assert time.monotonic() - started < 5.0
    assert_refused(gateway.get("/v1/keys", headers=key_header(tenant.key)))
    assert_refused(gateway.get("/v1/keys", headers=bearer(tenant.key)))


# Revocation reaches the gateway within this (README): a key, and the tokens minted from it.
REVOCATION_PROMISE_S = 30.0


def revocation_polls(gateway: httpx.Client) -> int:
    """How many times the gateway has fetched the revocation list (its /readyz says)."""
    response = gateway.get("/readyz")
    assert response.status_code == 200, response.text
    return int(response.json()["checks"]["revocations"]["polls"])


def after_a_whole_revocation_poll(gateway: httpx.Client) -> None:
    """Return once a poll that began after this call has completed: whatever was revoked
    before the call is then in force at the gateway. Waits for the poll, not for a time;
    fails if none completes within the promised delay."""
    target = revocation_polls(gateway) + 2  # the one under way may predate the call
    assert wait_until(lambda: revocation_polls(gateway) >= target, REVOCATION_PROMISE_S)


def test_a_revoked_key_and_the_tokens_minted_from_it_are_refused(
    admin: httpx.Client, gateway: httpx.Client
) -> None:
    tenant = new_tenant(admin, "minted")
    minted = exchange(gateway, tenant.key)  # a 15-minute JWT, verified without auth
    response = admin.post(f"{ADMIN_ROUTE}/{tenant.id}/keys", json={"name": "second"})
    assert response.status_code == 201, response.text
    second = response.json()["key"]
    for headers in (bearer(minted), key_header(tenant.key), key_header(second)):
        assert gateway.get("/v1/keys", headers=headers).status_code == 200

    response = admin.delete(f"/v1/admin/keys/{tenant.key_id}")
    assert response.status_code == 200, response.text
    after_a_whole_revocation_poll(gateway)

    assert_refused(gateway.get("/v1/keys", headers=bearer(minted)))
    assert_refused(gateway.get("/v1/keys", headers=key_header(tenant.key)))
    assert_refused(gateway.get("/v1/models", headers=bearer(minted)))
    # The tenant's other key, and tokens minted from it, are untouched.
    assert gateway.get("/v1/keys", headers=key_header(second)).status_code == 200
    assert gateway.get("/v1/keys", headers=bearer(exchange(gateway, second))).status_code == 200


def test_a_disabled_tenants_keys_and_tokens_are_refused_until_it_is_enabled(
    admin: httpx.Client, gateway: httpx.Client
) -> None:
    tenant, bystander = new_tenant(admin, "disabled"), new_tenant(admin, "bystander")
    minted = exchange(gateway, tenant.key)
    assert gateway.get("/v1/keys", headers=key_header(tenant.key)).status_code == 200

    response = admin.post(f"{ADMIN_ROUTE}/{tenant.id}/disable")
    assert response.status_code == 200, response.text
    after_a_whole_revocation_poll(gateway)
    assert_refused(gateway.get("/v1/keys", headers=bearer(minted)))
    assert_refused(gateway.get("/v1/keys", headers=key_header(tenant.key)))
    assert_refused(gateway.post("/v1/auth/token", headers=key_header(tenant.key)))
    assert gateway.get("/v1/keys", headers=key_header(bystander.key)).status_code == 200

    response = admin.post(f"{ADMIN_ROUTE}/{tenant.id}/enable")
    assert response.status_code == 200, response.text
    after_a_whole_revocation_poll(gateway)
    assert gateway.get("/v1/keys", headers=bearer(minted)).status_code == 200


def test_an_admin_token_narrowed_to_other_scopes_is_not_an_admin_token(
    platform: Platform, gateway: httpx.Client
) -> None:
    response = gateway.post(
        "/v1/auth/token",
        headers=key_header(platform.admin_key),
        data={"scope": "inference usage"},
    )
    assert response.status_code == 200, response.text
    narrowed = response.json()["access_token"]
    assert unverified(narrowed)[1]["roles"] == ["admin"]
    for path in (ADMIN_ROUTE, "/v1/admin/plans", "/v1/admin/models"):
        refused = gateway.get(path, headers=bearer(narrowed))
        assert_refused(refused)
        assert refused.status_code == 403
    # Straight to auth, around the gateway: refused there too.
    direct = httpx.get(platform.auth.url + ADMIN_ROUTE, headers=bearer(narrowed), timeout=10.0)
    assert direct.status_code == 403
    assert (
        gateway.get(ADMIN_ROUTE, headers=bearer(exchange(gateway, platform.admin_key))).status_code
        == 200
    )


def test_expired_key_is_refused(admin: httpx.Client, gateway: httpx.Client) -> None:
    tenant = new_tenant(admin, "expiring")
    expires_at = datetime.now(UTC) + timedelta(seconds=2)
    response = admin.post(
        f"{ADMIN_ROUTE}/{tenant.id}/keys",
        json={"name": "short-lived", "expires_at": expires_at.isoformat()},
    )
    assert response.status_code == 201, response.text
    short_lived = response.json()["key"]
    assert gateway.get("/v1/keys", headers=key_header(short_lived)).status_code == 200

    refused = wait_until(
        lambda: gateway.get("/v1/keys", headers=key_header(short_lived)).status_code == 401,
        timeout=8.0,
    )
    assert refused, "the gateway still accepts a key past its expires_at"
    assert_refused(gateway.get("/v1/keys", headers=key_header(short_lived)))
    assert_refused(gateway.post("/v1/auth/token", headers=key_header(short_lived)))
    # The tenant's other key is untouched.
    assert gateway.get("/v1/keys", headers=key_header(tenant.key)).status_code == 200


def test_key_expiry_without_a_utc_offset_is_a_client_error(
    platform: Platform, admin: httpx.Client, gateway: httpx.Client
) -> None:
    """A naive `expires_at` is ambiguous: refused with a 400, never a 5xx."""
    naive = (datetime.now(UTC) + timedelta(days=1)).replace(tzinfo=None).isoformat()
    response = admin.post(
        f"{ADMIN_ROUTE}/{platform.admin_tenant_id}/keys", json={"expires_at": naive}
    )
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    response = gateway.post(
        "/v1/keys", headers=key_header(platform.admin_key), json={"expires_at": naive}
    )
    assert response.status_code == 400, response.text


def test_valid_key_id_with_a_wrong_secret_is_refused(
    platform: Platform, gateway: httpx.Client
) -> None:
    prefix, secret = platform.admin_key.rsplit("_", 1)
    alphabet = string.ascii_letters + string.digits
    wrong = secret
    while wrong == secret:
        wrong = "".join(secrets.choice(alphabet) for _ in range(len(secret)))
    forged = f"{prefix}_{wrong}"
    assert_refused(gateway.get(ADMIN_ROUTE, headers=key_header(forged)))
    assert_refused(gateway.get(ADMIN_ROUTE, headers=bearer(forged)))
    assert_refused(gateway.post("/v1/auth/token", headers=key_header(forged)))


@pytest.mark.parametrize("param", ["api_key", "key"])
def test_key_in_the_query_string_is_refused_even_when_valid(
    platform: Platform, gateway: httpx.Client, param: str
) -> None:
    response = gateway.get(ADMIN_ROUTE, params={param: platform.admin_key})
    assert_refused(response)
    assert response.status_code == 401
    # Refused even alongside a valid header: a key that travelled in a URL is burnt.
    response = gateway.get(
        ADMIN_ROUTE, params={param: platform.admin_key}, headers=key_header(platform.admin_key)
    )
    assert_refused(response)
    # The token endpoint too: its URL, key included, must not travel on to the auth service.
    response = gateway.post("/v1/auth/token", params={param: platform.admin_key})
    assert_refused(response)
    assert response.json()["type"].endswith("/credentials-in-query")


def test_tenant_cannot_revoke_another_tenants_key(
    admin: httpx.Client, gateway: httpx.Client
) -> None:
    a, b = new_tenant(admin, "tenant-a"), new_tenant(admin, "tenant-b")
    response = gateway.delete(f"/v1/keys/{b.key_id}", headers=key_header(a.key))
    assert_refused(response)
    assert response.status_code == 403
    response = gateway.post(f"/v1/keys/{b.key_id}/rotate", headers=key_header(a.key))
    assert_refused(response)
    assert response.status_code == 403

    # B's key is untouched and still works.
    listing = gateway.get("/v1/keys", headers=key_header(b.key))
    assert listing.status_code == 200, listing.text
    (entry,) = listing.json()
    assert entry["id"] == b.key_id
    assert entry["revoked_at"] is None
    assert entry["replaced_by"] is None
    # And A sees only its own keys.
    assert [k["id"] for k in gateway.get("/v1/keys", headers=key_header(a.key)).json()] == [
        a.key_id
    ]


def test_tenant_token_on_an_admin_route_is_forbidden(
    admin: httpx.Client, gateway: httpx.Client
) -> None:
    tenant = new_tenant(admin, "not-admin")
    token = exchange(gateway, tenant.key)
    for headers in (key_header(tenant.key), bearer(token)):
        response = gateway.get(ADMIN_ROUTE, headers=headers)
        assert_refused(response)
        assert response.status_code == 403
    response = gateway.post("/v1/admin/signing-keys/rotate", headers=bearer(token))
    assert_refused(response)
    assert response.status_code == 403


# -- zero trust inside ------------------------------------------------------------------------


def test_internal_service_refuses_calls_without_a_valid_token(
    platform: Platform, gateway: httpx.Client
) -> None:
    """Straight to inference, around the gateway: no token, or a forged one, is a 401."""
    with httpx.Client(base_url=platform.inference.url, timeout=10.0) as inference:
        for path in ("/v1/models", "/v2/models/fraud/infer", "/v1/embeddings"):
            assert_refused(inference.post(path, json={}))
            assert inference.post(path, json={}).status_code == 401
        assert_refused(inference.get("/v1/models", headers=bearer(alg_none(platform))))
        for forge in (alg_none, hs256_with_the_public_key, signed_by_another_key, expired):
            response = inference.get("/v1/models", headers=bearer(forge(platform)))
            assert_refused(response)
            assert response.status_code == 401
        # An API key is the gateway's business: the internal service takes only JWTs.
        assert_refused(inference.get("/v1/models", headers=key_header(platform.admin_key)))
        assert_refused(inference.get("/v1/models", headers=bearer(platform.admin_key)))
        # The control: a real token gets past the check (to whatever the route answers).
        token = exchange(gateway, platform.admin_key)
        assert inference.get("/v1/models", headers=bearer(token)).status_code not in (401, 403)


# -- JWKS -------------------------------------------------------------------------------------


async def test_unknown_kids_cause_at_most_one_jwks_fetch_per_cooldown(
    platform: Platform,
) -> None:
    key = auth_signing_key(platform)
    async with httpx.AsyncClient(base_url=platform.gateway.url, timeout=15.0) as client:
        # The gateway loads the JWKS at first use: make sure that load is in the baseline.
        warm = await client.get(ADMIN_ROUTE, headers=bearer(rs256(key, admin_claims(platform))))
        assert warm.status_code == 200, warm.text
        before = jwks_fetches_seen_by_auth(platform)
        assert before >= 1, "the gateway's own JWKS load is not counted: wrong metric?"

        tokens = [
            rs256(key, admin_claims(platform), kid=secrets.token_urlsafe(12)) for _ in range(100)
        ]
        responses = await asyncio.gather(
            *(client.get(ADMIN_ROUTE, headers=bearer(token)) for token in tokens)
        )
        for response in responses:
            assert_refused(response)
            assert response.status_code == 401

    after = jwks_fetches_seen_by_auth(platform)
    assert after - before <= 1, f"{after - before:.0f} JWKS fetches for 100 unknown kids"


def test_signing_key_rotation_publishes_the_new_key_before_signing_with_it(
    platform: Platform, admin: httpx.Client, gateway: httpx.Client
) -> None:
    before_rotation = exchange(gateway, platform.admin_key)
    old_kid = unverified(before_rotation)[0]["kid"]

    response = admin.post("/v1/admin/signing-keys/rotate")
    assert response.status_code == 200, response.text
    rotation = response.json()
    new_kid = rotation["kid"]
    signs_from = datetime.fromisoformat(rotation["signs_from"])
    assert new_kid != old_kid
    assert signs_from > datetime.now(UTC)

    # Published at once by auth, next to the key that still signs; the gateway's shared
    # copy shows it within its cache period, long before the new key signs anything.
    with httpx.Client(base_url=platform.auth.url, timeout=10.0) as auth:
        assert {old_kid, new_kid} <= jwks_kids(auth)
    assert wait_until(
        lambda: {old_kid, new_kid} <= jwks_kids(gateway), timeout=PUBLIC_CACHE_SECONDS + 5.0
    )
    # Tokens are still signed by the old key until `signs_from`...
    after_rotation = exchange(gateway, platform.admin_key)
    assert unverified(after_rotation)[0]["kid"] == old_kid
    # ...and tokens it signed keep verifying, at the gateway and at an internal service.
    for token in (before_rotation, after_rotation):
        response = gateway.get(ADMIN_ROUTE, headers=bearer(token))
        assert response.status_code == 200, response.text
        direct = httpx.get(platform.inference.url + "/v1/models", headers=bearer(token))
        assert direct.status_code not in (401, 403), direct.text
    audit = admin.get("/v1/admin/audit").json()
    assert any(e["action"] == "signing-key.rotate" and e["target"] == new_kid for e in audit)
