"""Private Redis and PostgreSQL servers: they answer on their free port, PostgreSQL with the
shared test server's shape, and nothing of them is left once stopped."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import asyncpg
import pytest

from narthex.testing import servers
from narthex.testing.backing import postgres_answers, redis_answers
from narthex.testing.servers import (
    MissingBinary,
    PrivatePostgres,
    postgres_bindir,
    private_redis,
    redis_binary,
)

pytestmark = pytest.mark.slow  # real servers


def test_a_private_redis_answers_and_is_gone_after(tmp_path: Path) -> None:
    with private_redis(tmp_path) as server:
        assert redis_answers(server.url)
        assert server.process is not None
    assert server.process.poll() is not None
    assert not redis_answers(server.url)


async def create_and_drop(url: str) -> None:
    connection = await asyncpg.connect(url)
    try:
        assert await connection.fetchval("SELECT current_database()") == "test"
        assert await connection.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = 'postgres'")
        await connection.execute('CREATE DATABASE "narthex_t_private"')
        await connection.execute('DROP DATABASE "narthex_t_private" WITH (FORCE)')
    finally:
        await connection.close()


def test_a_private_postgres_answers_and_is_gone_after(tmp_path: Path) -> None:
    server = PrivatePostgres(tmp_path)
    server.start()
    try:
        # The shape tests expect of the shared server: trust, superuser postgres, db `test`.
        assert postgres_answers(server.url)
        asyncio.run(create_and_drop(server.url))
    finally:
        server.stop()
    assert server.process is not None
    assert server.process.poll() is not None
    assert server.data is not None
    assert not server.data.exists()
    assert not postgres_answers(server.url)


def test_missing_binaries_say_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(servers, "_DEBIAN_POSTGRES", tmp_path / "postgresql")
    with pytest.raises(MissingBinary, match="redis-server is not installed"):
        redis_binary()
    with pytest.raises(MissingBinary, match="PostgreSQL is not installed"):
        postgres_bindir()


def test_postgres_is_found_where_debian_puts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    debian = tmp_path / "postgresql"
    for version in ("9", "15", "16"):  # the newest by number, not by name
        (debian / version / "bin").mkdir(parents=True)
        (debian / version / "bin" / "initdb").touch(mode=0o755)
    monkeypatch.setattr(servers, "_DEBIAN_POSTGRES", debian)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert postgres_bindir() == debian / "16" / "bin"
    # One on PATH wins, where it really lives (a link to Debian's directory, say).
    (tmp_path / "bin").mkdir()
    os.symlink(debian / "15" / "bin" / "initdb", tmp_path / "bin" / "initdb")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert postgres_bindir() == debian / "15" / "bin"
