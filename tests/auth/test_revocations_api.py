"""What verifiers need to refuse minted tokens: tokens name their key, and auth lists the
keys revoked within a token's lifetime and the tenants disabled now."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
from jose import jwt

from narthex.auth.service import REVOCATION_LEEWAY, AuthService
from narthex.auth.settings import AuthSettings

TTL = AuthSettings.model_fields["token_ttl_seconds"].default  # the app fixture's


def claims(token: str) -> dict[str, object]:
    payload: dict[str, object] = jwt.get_unverified_claims(token)
    return payload


async def exchange(client: httpx.AsyncClient, key: str, **form: str) -> httpx.Response:
    if form:
        return await client.post("/v1/auth/token", headers={"X-API-Key": key}, data=form)
    return await client.post("/v1/auth/token", headers={"X-API-Key": key})


async def test_a_token_names_the_key_it_was_minted_from(
    auth: tuple[httpx.AsyncClient, AuthService],
) -> None:
    client, service = auth
    tenant = await service.create_tenant("acme", "standard", ["tenant"], actor="test")
    key, record = await service.create_key(tenant.id, "k", None, actor="test")
    response = await exchange(client, str(key))
    assert response.status_code == 200
    assert claims(response.json()["access_token"])["client_id"] == record.id


async def test_a_token_never_outlives_its_key(auth: tuple[httpx.AsyncClient, AuthService]) -> None:
    client, service = auth
    tenant = await service.create_tenant("acme", "standard", ["tenant"], actor="test")
    expires = datetime.now(UTC) + timedelta(seconds=120)
    key, _ = await service.create_key(tenant.id, "short", expires, actor="test")
    body = (await exchange(client, str(key))).json()
    token = claims(body["access_token"])
    assert isinstance(token["exp"], int)
    assert token["exp"] <= expires.timestamp()
    assert body["expires_in"] <= 120


async def test_the_list_holds_recently_revoked_keys_and_disabled_tenants(
    auth: tuple[httpx.AsyncClient, AuthService],
) -> None:
    client, service = auth
    acme = await service.create_tenant("acme", "standard", ["tenant"], actor="test")
    other = await service.create_tenant("other", "standard", ["tenant"], actor="test")
    _, kept = await service.create_key(acme.id, "kept", None, actor="test")
    _, revoked = await service.create_key(acme.id, "revoked", None, actor="test")
    _, old = await service.create_key(acme.id, "old", None, actor="test")

    empty = await client.get("/internal/v1/revocations")
    await service.revoke_key(revoked.id, actor="test")
    # Revoked longer ago than any token lives: every token minted from it has expired.
    window = TTL + REVOCATION_LEEWAY
    await service.store.revoke_key(old.id, datetime.now(UTC) - timedelta(seconds=window + 5))
    await service.set_disabled(other.id, True, actor="test")
    listed = await client.get("/internal/v1/revocations")  # no credentials: like JWKS

    assert empty.status_code == 200
    assert empty.json() == {"keys": [], "tenants": [], "window_seconds": window}
    assert listed.status_code == 200
    assert listed.json() == {"keys": [revoked.id], "tenants": [other.id], "window_seconds": window}
    assert kept.id not in listed.text


async def test_an_admin_disables_and_enables_a_tenant(
    auth: tuple[httpx.AsyncClient, AuthService],
) -> None:
    client, service = auth
    admin_tenant, admin_key = await service.bootstrap()
    tenant = await service.create_tenant("acme", "standard", ["tenant"], actor="test")
    key, _ = await service.create_key(tenant.id, "k", None, actor="test")
    admin = {
        "Authorization": f"Bearer {(await exchange(client, str(admin_key))).json()['access_token']}"
    }
    narrowed_token = (await exchange(client, str(admin_key), scope="inference usage")).json()
    narrowed = {"Authorization": f"Bearer {narrowed_token['access_token']}"}

    refused = await client.post(f"/v1/admin/tenants/{tenant.id}/disable", headers=narrowed)
    disabled = await client.post(f"/v1/admin/tenants/{tenant.id}/disable", headers=admin)
    no_exchange = await exchange(client, str(key))
    listed = (await client.get("/internal/v1/revocations")).json()
    enabled = await client.post(f"/v1/admin/tenants/{tenant.id}/enable", headers=admin)
    again = await exchange(client, str(key))
    audit = await client.get("/v1/admin/audit", headers=admin)

    assert refused.status_code == 403  # the admin role without the admin scope
    assert disabled.status_code == 200
    assert disabled.json()["disabled_at"] is not None
    assert no_exchange.status_code == 401
    assert listed["tenants"] == [tenant.id]
    assert enabled.status_code == 200
    assert enabled.json()["disabled_at"] is None
    assert again.status_code == 200
    actions = [(e["action"], e["target"]) for e in audit.json()]
    assert ("tenant.disable", tenant.id) in actions
    assert ("tenant.enable", tenant.id) in actions
    assert admin_tenant.id != tenant.id
