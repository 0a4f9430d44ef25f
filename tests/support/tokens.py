"""JWTs for apps built in-process: one test signing key, and a verifier that trusts only it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from narthex.common.security import JwksCache, SigningKey, TokenVerifier, issue_token

__all__ = ["KEY", "bearer", "static_verifier", "token"]

KEY = SigningKey.generate()


def token(roles: Sequence[str], scopes: Sequence[str], subject: str = "t_acme") -> str:
    return issue_token(
        KEY,
        issuer="narthex-auth",
        audience="narthex",
        subject=subject,
        plan="standard",
        roles=list(roles),
        scopes=list(scopes),
    )


def bearer(roles: Sequence[str], scopes: Sequence[str], subject: str = "t_acme") -> dict[str, str]:
    return {"Authorization": f"Bearer {token(roles, scopes, subject)}"}


@asynccontextmanager
async def static_verifier(_: Any) -> AsyncIterator[TokenVerifier]:
    """A `create_app(..., verifier=...)` factory: tokens signed by KEY, nothing else."""
    yield TokenVerifier(
        JwksCache.static({"keys": [KEY.public_jwk()]}), issuer="narthex-auth", audience="narthex"
    )
