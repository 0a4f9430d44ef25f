"""Which Redis and PostgreSQL a session uses: the configured one when it answers, else a
private one whose URL the tests read until it stops; else one line saying what to install."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from narthex.testing.backing import (
    POSTGRES,
    REDIS,
    Private,
    Unavailable,
    postgres_answers,
    provided,
    redis_answers,
)
from narthex.testing.processes import NotReady, free_port
from narthex.testing.servers import MissingBinary


@dataclass
class FakeServer:
    url: str = "redis://127.0.0.1:4242/0"
    events: list[str] = field(default_factory=list)
    fail: Exception | None = None

    def start(self) -> None:
        self.events.append("start")
        if self.fail is not None:
            raise self.fail

    def stop(self) -> None:
        self.events.append("stop")


def private(server: FakeServer) -> Callable[[Path], Private]:
    return lambda directory: server


def never(directory: Path) -> Private:
    raise AssertionError("no private server was wanted")


def test_the_configured_server_is_used_when_it_answers(tmp_path: Path) -> None:
    backing = replace(REDIS, answers=lambda url: url == "redis://10.0.0.5:6380/0", private=never)
    environ = {REDIS.env: "redis://10.0.0.5:6380/0"}
    with provided(backing, tmp_path, environ) as used:
        assert used.server is None
        assert used.line() == "Redis: 10.0.0.5:6380"
    assert environ == {REDIS.env: "redis://10.0.0.5:6380/0"}


def test_the_default_is_tried_when_the_variable_is_unset(tmp_path: Path) -> None:
    tried: list[str] = []

    def answers(url: str) -> bool:
        tried.append(url)
        return True

    backing = replace(POSTGRES, answers=answers, private=never)
    with provided(backing, tmp_path, {}) as used:
        assert used.line() == "PostgreSQL: 127.0.0.1:5432"
    assert tried == ["postgresql://postgres@127.0.0.1:5432/test"]


@pytest.mark.parametrize("before", [None, "redis://127.0.0.1:1/0"])
def test_a_private_server_is_started_when_nothing_answers(
    tmp_path: Path, before: str | None
) -> None:
    server = FakeServer()
    backing = replace(REDIS, answers=lambda url: False, private=private(server))
    environ = {} if before is None else {REDIS.env: before}
    with provided(backing, tmp_path, environ) as used:
        assert server.events == ["start"]
        assert environ[REDIS.env] == server.url  # what the tests, and their processes, read
        assert used.line() == "Redis: private redis-server on 127.0.0.1:4242"
    assert server.events == ["start", "stop"]
    assert environ.get(REDIS.env) == before


def test_a_missing_binary_is_one_line_saying_what_to_install(tmp_path: Path) -> None:
    def missing(directory: Path) -> Private:
        raise MissingBinary("redis-server is not installed")

    backing = replace(REDIS, answers=lambda url: False, private=missing)
    environ = {REDIS.env: "redis://:hunter2@127.0.0.1:1/0"}
    with pytest.raises(Unavailable) as raised, provided(backing, tmp_path, environ):
        pass
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("Redis: nothing answers at 127.0.0.1:1 and redis-server is not")
    assert "apt-get install redis-server" in message
    assert REDIS.env in message
    assert "hunter2" not in message


def test_a_private_server_that_does_not_start_is_unavailable(tmp_path: Path) -> None:
    server = FakeServer(fail=NotReady("postgres exited with 1"))
    backing = replace(POSTGRES, answers=lambda url: False, private=private(server))
    environ: dict[str, str] = {}
    expected = "private postgres did not start: postgres exited"
    with pytest.raises(Unavailable, match=expected), provided(backing, tmp_path, environ):
        pass
    assert environ == {}


def test_a_closed_port_does_not_answer() -> None:
    port = free_port()
    assert not redis_answers(f"redis://127.0.0.1:{port}/0")
    assert not postgres_answers(f"postgresql://postgres@127.0.0.1:{port}/test")


def test_this_session_has_both() -> None:
    """Whichever the plugin chose, the URLs the tests read answer."""
    assert redis_answers(REDIS.configured(os.environ))
    assert postgres_answers(POSTGRES.configured(os.environ))
