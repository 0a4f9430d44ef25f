"""`GET /v1/auth/limits`: the caller's plan as it is now, for the gateway to enforce."""

from __future__ import annotations

import httpx

from narthex.auth.service import AuthService


async def token_for(client: httpx.AsyncClient, key: str) -> str:
    response = await client.post("/v1/auth/token", headers={"X-API-Key": key})
    assert response.status_code == 200
    token: str = response.json()["access_token"]
    return token


async def test_a_tenant_reads_its_plan_limits_and_sees_a_plan_change_at_once(
    auth: tuple[httpx.AsyncClient, AuthService],
) -> None:
    client, service = auth
    tenant = await service.create_tenant("acme", "free", ["tenant"], actor="test")
    key, _ = await service.create_key(tenant.id, "k", None, actor="test")
    headers = {"Authorization": f"Bearer {await token_for(client, str(key))}"}

    before = await client.get("/v1/auth/limits", headers=headers)
    assert before.status_code == 200
    assert before.json() == {
        "tenant": tenant.id,
        "plan": "free",
        "rate_per_second": 1.0,
        "burst": 5,
        "daily_quota": 1000,
        "max_items_per_request": 10,
        "allowed_models": [],
    }

    await service.set_plan(tenant.id, "enterprise", actor="test")
    # Same token, issued under the old plan: the answer is the plan as it is now.
    after = await client.get("/v1/auth/limits", headers=headers)
    assert after.json()["plan"] == "enterprise"
    assert after.json()["burst"] == 500


async def test_limits_need_a_token(auth: tuple[httpx.AsyncClient, AuthService]) -> None:
    client, _ = auth
    assert (await client.get("/v1/auth/limits")).status_code == 401
