"""Service identities: the only holders of service scopes, made only by the operator's tooling."""

from __future__ import annotations

import httpx
import pytest

from narthex.auth.service import AuthService
from narthex.common.errors import Conflict, Forbidden
from narthex.common.scopes import ADMIN, FEATURES_LOOKUP, SERVICE, TENANT

Auth = tuple[httpx.AsyncClient, AuthService]


async def exchange(client: httpx.AsyncClient, key: str, scope: str | None = None) -> httpx.Response:
    form = None if scope is None else {"scope": scope}
    return await client.post("/v1/auth/token", headers={"X-API-Key": key}, data=form)


async def admin_headers(client: httpx.AsyncClient, service: AuthService) -> dict[str, str]:
    _, key = await service.bootstrap()
    response = await exchange(client, str(key))
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


async def test_a_service_identitys_token_carries_the_lookup_scope_and_nothing_else(
    auth: Auth,
) -> None:
    client, service = auth
    identity = await service.ensure_service("service-inference", actor="test")
    assert list(identity.roles) == [SERVICE]
    key, _ = await service.fresh_key(identity.id, "run", actor="test")

    response = await exchange(client, str(key))
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == FEATURES_LOOKUP
    # A tenant's scope is not the service's to ask for.
    refused = await exchange(client, str(key), scope="inference")
    assert refused.status_code == 400
    assert refused.json()["type"].endswith("/invalid-scope")


@pytest.mark.parametrize("role", [ADMIN, TENANT])
async def test_no_tenant_admins_included_can_be_granted_the_lookup_scope(
    auth: Auth, role: str
) -> None:
    client, service = auth
    tenant = await service.create_tenant(f"acme-{role}", "standard", [role], actor="test")
    key, _ = await service.create_key(tenant.id, "k", None, actor="test")

    plain = await exchange(client, str(key))
    assert FEATURES_LOOKUP not in plain.json()["scope"].split()
    for asked in (FEATURES_LOOKUP, f"inference {FEATURES_LOOKUP}"):
        response = await exchange(client, str(key), scope=asked)
        assert response.status_code == 400, response.text
        assert response.json()["type"].endswith("/invalid-scope")
        assert FEATURES_LOOKUP in response.json()["detail"]


async def test_the_admin_api_makes_no_service_identity_nor_its_keys(auth: Auth) -> None:
    client, service = auth
    admin = await admin_headers(client, service)
    created = await client.post(
        "/v1/admin/tenants", json={"name": "sneaky", "roles": [SERVICE]}, headers=admin
    )
    assert created.status_code == 422, created.text

    identity = await service.ensure_service("service-inference", actor="test")
    key, _ = await service.fresh_key(identity.id, "run", actor="test")
    minted = await client.post(
        f"/v1/admin/tenants/{identity.id}/keys", json={"name": "mine"}, headers=admin
    )
    assert minted.status_code == 403, minted.text
    rotated = await client.post(f"/v1/admin/keys/{key.key_id}/rotate", headers=admin)
    assert rotated.status_code == 403, rotated.text
    assert [k.id for k in await service.list_keys(identity.id)] == [key.key_id]
    # Revoking stays open to admins: the kill switch for a leaked service key.
    revoked = await client.delete(f"/v1/admin/keys/{key.key_id}", headers=admin)
    assert revoked.status_code == 200, revoked.text
    assert (await exchange(client, str(key))).status_code == 401


async def test_the_tooling_makes_a_service_identity_once_and_a_fresh_key_each_run(
    auth: Auth,
) -> None:
    _, service = auth
    first = await service.ensure_service("service-inference", actor="test")
    assert await service.ensure_service("service-inference", actor="test") == first
    key1, retired1 = await service.fresh_key(first.id, "run", actor="test")
    key2, retired2 = await service.fresh_key(first.id, "run", actor="test")
    assert (retired1, retired2) == (0, 1)
    live = [k.id for k in await service.list_keys(first.id) if k.revoked_at is None]
    assert live == [key2.key_id]
    assert key1.key_id != key2.key_id

    await service.create_tenant("acme", "standard", [TENANT], actor="test")
    with pytest.raises(Conflict, match="not a service identity"):
        await service.ensure_service("acme", actor="test")
    # Through the API path (no allow_service), a service identity's keys are refused.
    with pytest.raises(Forbidden):
        await service.create_key(first.id, "k", None, actor="test")
