"""JWTs for apps built in-process: one test signing key, and a verifier that trusts only it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

from narthex.common.jwks import JwksCache
from narthex.common.tokens import SigningKey, TokenVerifier, issue_token

__all__ = ["KEY", "SUITE_TTL", "bearer", "static_verifier", "token", "verifier"]

KEY = SigningKey.generate()
# Modules mint their headers once, at collection, and the suite can run for half an hour on a
# loaded machine: a token must outlive the run, or a late test meets an expired one. Tests of
# expiry pass their own `ttl` (or drive the verifier's clock).
SUITE_TTL = 24 * 3600


def token(
    roles: Iterable[str],
    scopes: Iterable[str],
    subject: str = "t_acme",
    *,
    plan: str = "standard",
    ttl: int = SUITE_TTL,
    client_id: str | None = None,
) -> str:
    return issue_token(
        KEY,
        issuer="narthex-auth",
        audience="narthex",
        subject=subject,
        plan=plan,
        roles=list(roles),
        scopes=list(scopes),
        ttl=ttl,
        client_id=client_id,
    )


def bearer(roles: Iterable[str], scopes: Iterable[str], subject: str = "t_acme") -> dict[str, str]:
    return {"Authorization": f"Bearer {token(roles, scopes, subject)}"}


def verifier() -> TokenVerifier:
    """Accepts tokens signed by KEY, nothing else."""
    return TokenVerifier(
        JwksCache.static({"keys": [KEY.public_jwk()]}), issuer="narthex-auth", audience="narthex"
    )


@asynccontextmanager
async def static_verifier(_: Any) -> AsyncIterator[TokenVerifier]:
    """A `create_app(..., verifier=...)` factory: tokens signed by KEY, nothing else."""
    yield verifier()
