"""The limiter's pipelined Redis client: ordering, errors, timeouts, reconnects, both loops."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from redis import Redis as SyncRedis
from redis.exceptions import ConnectionError, NoScriptError, RedisError, ResponseError

from narthex.common.settings import SettingsError, load_settings
from narthex.gateway.resp import Endpoint, PipelinedRedis
from narthex.gateway.settings import GatewaySettings
from tests.support.databases import service_unavailable
from tests.support.platform import PrivateRedis, private_redis
from tests.support.redis import REDIS_URL

Runner = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    """Runs a scenario on a fresh loop of each kind: the gateway serves on uvloop."""
    if request.param == "uvloop":
        return uvloop.run
    return asyncio.run


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PrivateRedis]:
    with private_redis(tmp_path) as server:
        yield server


def shared_redis_up() -> None:
    try:
        SyncRedis.from_url(REDIS_URL, socket_connect_timeout=3.0).ping()
    except (RedisError, OSError) as exc:
        service_unavailable(f"Redis at {REDIS_URL} unreachable: {exc!r}")


def test_concurrent_callers_each_get_their_own_reply(run: Runner) -> None:
    shared_redis_up()

    async def scenario() -> None:
        client = PipelinedRedis.from_url(REDIS_URL, timeout=3.0)
        try:
            # Many callers in one loop turn share one write; replies come back in order.
            replies = await asyncio.gather(*(client.execute_command("ECHO", i) for i in range(500)))
            assert replies == [str(i).encode() for i in range(500)]
            assert await client.execute_command("ECHO", "après") == "après".encode()
        finally:
            await client.aclose()

    run(scenario())


def test_an_error_reply_fails_only_its_own_caller(run: Runner) -> None:
    shared_redis_up()

    async def scenario() -> None:
        client = PipelinedRedis.from_url(REDIS_URL, timeout=3.0)
        try:
            replies = await asyncio.gather(
                client.execute_command("ECHO", "before"),
                client.execute_command("EVALSHA", "0" * 40, 0),
                client.execute_command("NO-SUCH-COMMAND"),
                client.execute_command("ECHO", "after"),
                return_exceptions=True,
            )
            before, noscript, unknown, after = replies
            assert (before, after) == (b"before", b"after")
            assert isinstance(noscript, NoScriptError)
            assert isinstance(unknown, ResponseError)
            assert not isinstance(unknown, NoScriptError)
            assert "unknown command" in str(unknown)
            assert await client.execute_command("PING") == b"PONG"
        finally:
            await client.aclose()

    run(scenario())


def test_cancelled_callers_leave_the_others_their_replies(run: Runner) -> None:
    shared_redis_up()

    async def scenario() -> None:
        client = PipelinedRedis.from_url(REDIS_URL, timeout=3.0)
        try:
            await client.execute_command("PING")  # connected before the calls go out
            calls = [asyncio.ensure_future(client.execute_command("ECHO", i)) for i in range(100)]
            await asyncio.sleep(0)  # sent, not yet answered
            for call in calls[::2]:
                call.cancel()
            results = await asyncio.gather(*calls, return_exceptions=True)
            for i, result in enumerate(results):
                if i % 2:
                    assert result == str(i).encode()
                else:
                    assert isinstance(result, asyncio.CancelledError)
            assert await client.execute_command("ECHO", "next") == b"next"
        finally:
            await client.aclose()

    run(scenario())


def test_a_server_that_does_not_answer_times_out_every_caller(run: Runner) -> None:
    async def scenario() -> None:
        accepted: list[asyncio.StreamWriter] = []

        async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)  # reads nothing, answers nothing, keeps the socket open

        listener = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        client = PipelinedRedis(Endpoint("127.0.0.1", port), timeout=0.2)
        try:
            results = await asyncio.gather(
                *(client.execute_command("PING") for _ in range(10)), return_exceptions=True
            )
            assert all(isinstance(r, TimeoutError) for r in results), results
            # The silent connection was dropped; the next call makes a new one (and waits
            # its own timeout), it does not queue behind a dead socket.
            with pytest.raises(TimeoutError):
                await client.execute_command("PING")
            assert len(accepted) == 2
        finally:
            await client.aclose()
            for writer in accepted:
                writer.close()
            listener.close()
            await listener.wait_closed()

    run(scenario())


def test_nobody_listening_is_an_os_error(run: Runner) -> None:
    async def scenario() -> None:
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()
        client = PipelinedRedis(Endpoint("127.0.0.1", port), timeout=0.5)
        with pytest.raises(ConnectionRefusedError):
            await client.execute_command("PING")
        await client.aclose()

    run(scenario())


def test_a_killed_server_fails_the_call_and_a_restarted_one_is_used_again(
    run: Runner, server: PrivateRedis
) -> None:
    async def scenario() -> None:
        client = PipelinedRedis.from_url(server.url, timeout=2.0, connect_timeout=2.0)
        try:
            assert await client.execute_command("SET", "k", "v") == b"OK"
            server.kill()
            with pytest.raises((ConnectionError, OSError)):
                await client.execute_command("GET", "k")
            server.start()
            # A fresh server (no persistence): the key is gone, the client is back.
            assert await client.execute_command("GET", "k") is None
            assert await client.execute_command("PING") == b"PONG"
        finally:
            await client.aclose()

    run(scenario())


def test_the_url_selects_the_database_and_authenticates(run: Runner, server: PrivateRedis) -> None:
    admin = SyncRedis.from_url(server.url)
    admin.acl_setuser(
        "limiter", enabled=True, passwords=["+s3cret/x"], commands=["+@all"], keys=["*"]
    )
    admin.config_set("requirepass", "pa:ss@word")
    admin.close()
    port = server.port

    async def scenario() -> None:
        refused = PipelinedRedis.from_url(f"redis://127.0.0.1:{port}/0")
        with pytest.raises(ResponseError, match=r"^NOAUTH"):
            await refused.execute_command("PING")
        await refused.aclose()

        urls = [
            f"redis://:pa%3Ass%40word@127.0.0.1:{port}/3",  # the default user, by password
            f"redis://limiter:s3cret%2Fx@127.0.0.1:{port}/3",  # an ACL user
        ]
        for url in urls:
            client = PipelinedRedis.from_url(url)
            try:
                assert await client.execute_command("SET", "in-db-3", url) == b"OK"
                info = (await client.execute_command("CLIENT", "INFO")).decode()
                assert " db=3 " in info
            finally:
                await client.aclose()

    run(scenario())


@pytest.mark.parametrize(
    ("url", "endpoint"),
    [
        ("redis://127.0.0.1:6379/0", Endpoint("127.0.0.1", 6379, 0)),
        ("redis://redis", Endpoint("redis", 6379, 0)),
        ("redis://u:p%40w@h:7000/2", Endpoint("h", 7000, 2, "u", "p@w")),
        ("redis://:pw@h", Endpoint("h", 6379, 0, None, "pw")),
    ],
)
def test_endpoint_from_url(url: str, endpoint: Endpoint) -> None:
    assert Endpoint.from_url(url) == endpoint


@pytest.mark.parametrize(
    "url", ["rediss://h:6379/0", "unix:///tmp/redis.sock", "redis://h/db0", "http://h"]
)
def test_an_unsupported_redis_url_is_refused_at_startup(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NARTHEX_GATEWAY_REDIS_URL", url)
    with pytest.raises(SettingsError, match="REDIS_URL"):
        load_settings(GatewaySettings)
