"""A response with a known length leaves in one write: `_OneWrite` under uvicorn's own cycle."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from narthex.common.server import _OneWrite


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


def cycle(
    transport: FakeTransport, done: list[int], method: str = "GET", keep_alive: bool = True
) -> RequestResponseCycle:
    logger = logging.getLogger("test")
    made = RequestResponseCycle(
        scope={"type": "http", "method": method, "path": "/", "http_version": "1.1"},  # type: ignore[typeddict-item]
        transport=transport,  # type: ignore[arg-type]
        flow=FlowControl(transport),  # type: ignore[arg-type]
        logger=logger,
        access_logger=logger,
        access_log=False,
        default_headers=[],
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=keep_alive,
        on_response=lambda: done.append(len(transport.writes)),
    )
    made.transport = _OneWrite(transport, made)  # type: ignore[arg-type,assignment]
    return made


def start(headers: list[tuple[bytes, bytes]], status: int = 200) -> Any:
    return {"type": "http.response.start", "status": status, "headers": headers}


def body(data: bytes, more: bool = False) -> Any:
    return {"type": "http.response.body", "body": data, "more_body": more}


async def test_a_response_with_a_length_is_one_write() -> None:
    transport, done = FakeTransport(), list[int]()
    c = cycle(transport, done)
    await c.send(start([(b"content-length", b"5")]))
    assert transport.writes == []
    await c.send(body(b"hello"))
    assert len(transport.writes) == 1
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[0].endswith(b"content-length: 5\r\n\r\nhello")
    assert done == [1]  # written before the cycle tells the protocol it is complete


async def test_a_body_in_parts_joins_only_its_first_part() -> None:
    transport, done = FakeTransport(), list[int]()
    c = cycle(transport, done)
    await c.send(start([(b"content-length", b"6")]))
    await c.send(body(b"abc", more=True))
    await c.send(body(b"def"))
    assert len(transport.writes) == 2
    assert transport.writes[0].endswith(b"\r\n\r\nabc")
    assert transport.writes[1] == b"def"


async def test_a_chunked_head_is_not_held() -> None:
    transport, done = FakeTransport(), list[int]()
    c = cycle(transport, done)
    await c.send(start([]))
    assert len(transport.writes) == 1  # a stream's head goes out before its first chunk
    await c.send(body(b"x"))
    assert transport.writes[1] == b"1\r\nx\r\n0\r\n\r\n"


@pytest.mark.parametrize("status", [200, 204])
async def test_a_head_request_has_its_head_written_before_completion(status: int) -> None:
    transport, done = FakeTransport(), list[int]()
    c = cycle(transport, done, method="HEAD")
    await c.send(start([(b"content-length", b"5")], status=status))
    await c.send(body(b""))
    assert len(transport.writes) == 1
    assert transport.writes[0].endswith(b"content-length: 5\r\n\r\n")
    assert done == [1]


async def test_a_closing_response_is_written_before_the_close() -> None:
    transport, done = FakeTransport(), list[int]()
    c = cycle(transport, done, keep_alive=False)
    await c.send(start([(b"content-length", b"2")]))
    await c.send(body(b"ok"))
    assert len(transport.writes) == 1
    assert transport.writes[0].endswith(b"\r\n\r\nok")
    assert transport.closed


async def test_a_held_head_is_flushed_by_a_close() -> None:
    transport, done = FakeTransport(), list[int]()
    c = cycle(transport, done)
    await c.send(start([(b"content-length", b"2")]))
    c.transport.close()
    assert len(transport.writes) == 1
    assert transport.closed
