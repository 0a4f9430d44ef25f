"""API keys: `nx_<env>_<id>_<secret>`, generated, parsed, and checked against a peppered hash."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
from dataclasses import dataclass, field

__all__ = [
    "API_KEY_PREFIX",
    "ApiKey",
    "cache_key",
    "generate_api_key",
    "hash_secret",
    "looks_like_api_key",
    "parse_api_key",
    "secret_matches",
]

API_KEY_PREFIX = "nx_"
_KEY_ID_ALPHABET = string.ascii_lowercase + string.digits
_SECRET_ALPHABET = string.ascii_letters + string.digits
_KEY_ID_LENGTH = 16
_SECRET_LENGTH = 40
_ENV = re.compile(r"[a-z]{2,8}")
# No part can contain "_", so the split into env, id and secret is unambiguous.
_API_KEY = re.compile(r"nx_([a-z]{2,8})_([a-z0-9]{16})_([A-Za-z0-9]{40})")


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A parsed `nx_<env>_<id>_<secret>` key. Only the secret's hash is ever stored."""

    env: str
    key_id: str
    secret: str = field(repr=False)

    def __post_init__(self) -> None:
        # Validated here so that every ApiKey prints as a key parse_api_key accepts.
        if _API_KEY.fullmatch(f"nx_{self.env}_{self.key_id}_{self.secret}") is None:
            raise ValueError("not a valid API key")

    @property
    def prefix(self) -> str:
        """`nx_<env>_<id>`: names the key in listings and logs without revealing it."""
        return f"{API_KEY_PREFIX}{self.env}_{self.key_id}"

    def __str__(self) -> str:
        return f"{self.prefix}_{self.secret}"


def generate_api_key(env: str) -> ApiKey:
    if _ENV.fullmatch(env) is None:
        raise ValueError("env must be 2 to 8 lowercase letters")
    key_id = "".join(secrets.choice(_KEY_ID_ALPHABET) for _ in range(_KEY_ID_LENGTH))
    secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(_SECRET_LENGTH))
    return ApiKey(env, key_id, secret)


def parse_api_key(value: str) -> ApiKey | None:
    match = _API_KEY.fullmatch(value)
    if match is None:
        return None
    env, key_id, secret = match.groups()
    return ApiKey(env, key_id, secret)


def looks_like_api_key(value: str) -> bool:
    """Tells an API key from a JWT in `Authorization: Bearer` (a JWT starts with `eyJ`)."""
    return value.startswith(API_KEY_PREFIX)


def hash_secret(pepper: str, secret: str) -> str:
    # The secret has ~238 random bits, so a fast hash is enough; the pepper (kept out of
    # the database) makes a stolen table useless on its own.
    return hashlib.sha256((pepper + secret).encode("utf-8")).hexdigest()


def secret_matches(pepper: str, secret: str, stored_hash: str) -> bool:
    # Compared as bytes: compare_digest refuses non-ASCII str, and a stored value is data.
    computed = hash_secret(pepper, secret).encode("ascii")
    return hmac.compare_digest(computed, stored_hash.encode("utf-8"))


def cache_key(api_key: str) -> str:
    """What the gateway files an exchanged token under, so the key itself is never kept."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()
