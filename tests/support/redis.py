"""The local test Redis under a private key prefix: `narthex.testing.redis`, under its old name."""

from __future__ import annotations

from narthex.testing.redis import (
    REDIS_URL,
    RedisScratch,
    delete_prefix,
    redis_scratch,
)

__all__ = [
    "REDIS_URL",
    "RedisScratch",
    "delete_prefix",
    "redis_scratch",
]
