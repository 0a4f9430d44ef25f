"""A client to the local test Redis with a private key prefix, whose keys are deleted after."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.exceptions import RedisError

from narthex.testing.backing import REDIS
from narthex.testing.missing import service_unavailable

__all__ = [
    "REDIS_URL",
    "RedisScratch",
    "delete_prefix",
    "private_prefix",
    "redis_scratch",
]

# NARTHEX_TEST_REDIS_URL, or the default; a private server's when the session started one
# (`backing`). No persistence is assumed: tests share this server, so each one stays under
# its own prefix.
REDIS_URL = REDIS.configured(os.environ)
_CONNECT_TIMEOUT_S = 3.0
_DELETE_BATCH = 500
# redis-py's default pool raises once 100 connections are busy; a bounded pool that makes
# callers wait is what a server under load wants, and what a test of 200 concurrent calls needs.
_MAX_CONNECTIONS = 32


@dataclass(frozen=True, slots=True)
class RedisScratch:
    """A connected client and the prefix (`narthex-test:<uuid>`) this test owns."""

    client: Redis
    prefix: str


@asynccontextmanager
async def redis_scratch(url: str = REDIS_URL) -> AsyncIterator[RedisScratch]:
    """Yield a client and a fresh prefix; every key under the prefix is deleted afterwards.

    Skips when Redis is unreachable, and fails instead when `CI` is "true".
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=_MAX_CONNECTIONS,
        timeout=_CONNECT_TIMEOUT_S,
        socket_connect_timeout=_CONNECT_TIMEOUT_S,
        socket_timeout=_CONNECT_TIMEOUT_S,
    )
    client = Redis.from_pool(pool)  # the client owns the pool: closing it closes the pool
    try:
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            service_unavailable(f"Redis at {url} unreachable: {exc!r}")
        async with private_prefix(client) as prefix:
            yield RedisScratch(client, prefix)
    finally:
        await client.aclose()


@asynccontextmanager
async def private_prefix(client: Redis | RedisCluster) -> AsyncIterator[str]:
    """A fresh prefix (`narthex-test:<uuid>`) on `client`'s server; every key under it is
    deleted afterwards."""
    prefix = f"narthex-test:{uuid.uuid4().hex}"
    try:
        yield prefix
    finally:
        await delete_prefix(client, prefix)


async def delete_prefix(client: Redis | RedisCluster, prefix: str) -> int:
    """Delete every key under `prefix:` (SCAN, not KEYS, so a big server is not blocked;
    a cluster client scans every node and deletes slot by slot)."""
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + ":*"
    deleted, batch = 0, []
    async for key in client.scan_iter(match=pattern, count=_DELETE_BATCH):
        batch.append(key)
        if len(batch) >= _DELETE_BATCH:
            deleted += await client.delete(*batch)
            batch.clear()
    if batch:
        deleted += await client.delete(*batch)
    return deleted
