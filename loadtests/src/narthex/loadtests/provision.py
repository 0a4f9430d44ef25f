"""A run's tenants, keys and plans, made through the gateway's admin API and undone after:
keys revoked, tenants disabled (the admin API deletes neither; plans stay, named per run)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

__all__ = ["ADMIN_KEY_ENV", "ProvisionError", "Provisioner", "TenantCredentials", "plan_name"]

log = logging.getLogger(__name__)

ADMIN_TIMEOUT_S = 15.0
# Where the operator's key for a run is given (never on a command line: `ps` shows those).
ADMIN_KEY_ENV = "NARTHEX_LOADTEST_ADMIN_KEY"


class ProvisionError(Exception):
    """The admin API refused or could not be reached: one line saying which call and why."""


@dataclass(frozen=True)
class TenantCredentials:
    """One tenant of the run, as its users need it (the key is a secret: never logged)."""

    user_class: str
    tenant_id: str
    key_id: str
    key: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, str]) -> TenantCredentials:
        return cls(**data)


def plan_name(run_id: str, what: str) -> str:
    # The admin API's plan names: lowercase, digits and dashes, at most 32 characters.
    return f"lt-{run_id}-{what}"[:32].rstrip("-")


class Provisioner:
    """Admin API calls with the operator's key; remembers what it made so that `cleanup`
    undoes exactly that, whatever failed in between."""

    def __init__(self, gateway_url: str, admin_key: str, run_id: str, key_ttl_s: float) -> None:
        self.run_id = run_id
        self.key_ttl_s = key_ttl_s
        self.client = httpx.Client(
            base_url=gateway_url,
            headers={"Authorization": f"Bearer {admin_key}"},
            timeout=ADMIN_TIMEOUT_S,
            trust_env=False,
        )
        self.tenants: list[TenantCredentials] = []
        self.plans: list[str] = []

    def close(self) -> None:
        self.client.close()

    def _call(self, method: str, path: str, expected: int, body: Any = None) -> Any:
        try:
            response = self.client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise ProvisionError(f"{method} {path}: {exc!r}") from None
        if response.status_code != expected:
            detail = response.text[:300]
            raise ProvisionError(f"{method} {path}: {response.status_code} {detail}")
        return response.json()

    def plan(self, what: str, rate: float, burst: int, daily_quota: int, max_items: int) -> str:
        name = plan_name(self.run_id, what)
        self._call(
            "POST",
            "/v1/admin/plans",
            201,
            {
                "name": name,
                "rate_per_second": rate,
                "burst": burst,
                "daily_quota": daily_quota,
                "max_items_per_request": max_items,
                "allowed_models": [],
            },
        )
        self.plans.append(name)
        return name

    def tenant(self, user_class: str, plan: str, *, admin: bool = False) -> TenantCredentials:
        """A tenant for `user_class` on `plan`, and a key that expires on its own should
        the cleanup never run (a killed process)."""
        created = self._call(
            "POST",
            "/v1/admin/tenants",
            201,
            {
                "name": f"loadtest-{self.run_id}-{user_class}",
                "plan": plan,
                "roles": ["admin" if admin else "tenant"],
            },
        )
        tenant_id = str(created["id"])
        # Remembered before the key: a tenant whose key failed is still disabled after.
        self.tenants.append(TenantCredentials(user_class, tenant_id, "", ""))
        expires = datetime.now(UTC) + timedelta(seconds=self.key_ttl_s)
        key = self._call(
            "POST",
            f"/v1/admin/tenants/{tenant_id}/keys",
            201,
            {"name": f"loadtest-{self.run_id}", "expires_at": expires.isoformat()},
        )
        credentials = TenantCredentials(user_class, tenant_id, str(key["id"]), str(key["key"]))
        self.tenants[-1] = credentials
        return credentials

    def cleanup(self) -> list[str]:
        """Every key revoked and every tenant disabled; the failures, one line each (the
        rest is still done)."""
        failures: list[str] = []
        for tenant in self.tenants:
            if tenant.key_id:
                try:
                    self._call("DELETE", f"/v1/admin/keys/{tenant.key_id}", 200)
                except ProvisionError as exc:
                    failures.append(str(exc))
            try:
                self._call("POST", f"/v1/admin/tenants/{tenant.tenant_id}/disable", 200)
            except ProvisionError as exc:
                failures.append(str(exc))
        self.tenants = []
        return failures
