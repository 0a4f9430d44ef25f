"""The Redis and PostgreSQL a test session runs against: the configured ones when they
answer, else private servers started for the session (`servers`); when neither, one line
saying what to install."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import asyncpg
from redis import Redis as SyncRedis
from redis.exceptions import RedisError

from narthex.testing.servers import MissingBinary, PrivatePostgres, PrivateRedis, redis_binary

__all__ = [
    "POSTGRES",
    "REDIS",
    "Backing",
    "Private",
    "Provided",
    "Unavailable",
    "postgres_answers",
    "provided",
    "redis_answers",
]

_ANSWER_TIMEOUT_S = 3.0


class Private(Protocol):
    """A server started for the session (`servers.PrivateRedis`, `PrivatePostgres`)."""

    url: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Unavailable(RuntimeError):
    """Nothing answers at the configured URL and no private server can be started; the
    message is one line saying what to install."""


@dataclass(frozen=True)
class Backing:
    """One service the tests need: where they look for it and how to start one instead."""

    name: str  # as the report line says it
    env: str  # the variable the tests read its URL from
    default: str
    binary: str  # its server's, as the report line says it
    package: str  # the Debian package of its server
    answers: Callable[[str], bool]
    private: Callable[[Path], Private]  # raises MissingBinary when its binary is missing

    def configured(self, environ: MutableMapping[str, str]) -> str:
        return environ.get(self.env) or self.default


@dataclass(frozen=True)
class Provided:
    """What the session uses for one `Backing`: the configured server, or a private one."""

    backing: Backing
    url: str
    server: Private | None

    def line(self) -> str:
        """e.g. `Redis: 127.0.0.1:6379`, `PostgreSQL: private postgres on 127.0.0.1:41234`."""
        if self.server is None:
            return f"{self.backing.name}: {_address(self.url)}"
        return f"{self.backing.name}: private {self.backing.binary} on {_address(self.url)}"


def _address(url: str) -> str:
    """host:port of `url`, without the password a URL may hold."""
    where = urlsplit(url)
    return f"{where.hostname}:{where.port}"


@contextmanager
def provided(
    backing: Backing, directory: Path, environ: MutableMapping[str, str]
) -> Iterator[Provided]:
    """The configured server if it answers; else a private one, its URL in `environ` (so
    every test, and every process a test starts, reads it) until it is stopped on exit."""
    url = backing.configured(environ)
    if backing.answers(url):
        yield Provided(backing, url, None)
        return
    try:
        server = backing.private(directory)
    except MissingBinary as exc:
        raise Unavailable(
            f"{backing.name}: nothing answers at {_address(url)} and {exc}: `apt-get install"
            f" {backing.package}` (`make test-tools` does it, as root), or set {backing.env}"
            f" to a {backing.name} that answers"
        ) from None
    try:
        server.start()  # stops what it started when it fails
    except (RuntimeError, OSError) as exc:
        raise Unavailable(
            f"{backing.name}: nothing answers at {_address(url)} and a private"
            f" {backing.binary} did not start: {exc}"
        ) from exc
    before = environ.get(backing.env)
    try:
        environ[backing.env] = server.url
        yield Provided(backing, server.url, server)
    finally:
        if before is None:
            environ.pop(backing.env, None)
        else:
            environ[backing.env] = before
        server.stop()


def redis_answers(url: str) -> bool:
    client = SyncRedis.from_url(
        url, socket_connect_timeout=_ANSWER_TIMEOUT_S, socket_timeout=_ANSWER_TIMEOUT_S
    )
    try:
        return bool(client.ping())
    except (RedisError, OSError):
        return False
    finally:
        client.close()


def postgres_answers(url: str) -> bool:
    """Whether `url` accepts a connection (not from inside a running event loop)."""

    async def connect() -> None:
        connection = await asyncpg.connect(url, timeout=_ANSWER_TIMEOUT_S)
        await connection.close()

    try:
        asyncio.run(connect())
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    return True


def _private_redis(directory: Path) -> PrivateRedis:
    redis_binary()  # MissingBinary before anything starts
    return PrivateRedis(directory)


REDIS = Backing(
    name="Redis",
    env="NARTHEX_TEST_REDIS_URL",
    default="redis://127.0.0.1:6379/0",
    binary="redis-server",
    package="redis-server",
    answers=redis_answers,
    private=_private_redis,
)
# A maintenance database on a server that trusts local connections; CREATE DATABASE rights.
POSTGRES = Backing(
    name="PostgreSQL",
    env="NARTHEX_TEST_POSTGRES_URL",
    default="postgresql://postgres@127.0.0.1:5432/test",
    binary="postgres",
    package="postgresql",
    answers=postgres_answers,
    private=PrivatePostgres,
)
