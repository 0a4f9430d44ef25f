"""A real HTTP/1.1 server on 127.0.0.1 that misbehaves on demand.

Tests that exercise timeouts, retries and circuit breaking need an upstream that is
slow, fails, or drops connections *for real*: a mock transport never shows what the
network stack and the client's connection pool do. `UpstreamServer` runs in the test's
own event loop (``asyncio.start_server`` and a small HTTP/1.1 parser, keep-alive
included), records every request it receives, and is steered from Python::

    async with UpstreamServer() as server:
        server.behave("/slow", delay=0.5)           # answer /slow after 0.5 s
        server.behave(None, status=503, times=2)    # next 2 requests anywhere: 503
        server.behave("/gone", drop=True)           # read the request, reset the socket
        ... ServiceClient("svc", server.url) ...
        assert server.calls("/slow") == 1

A path rule wins over the global rule; a rule given ``times=K`` applies to the next K
requests it matches and then disappears, so the next rule down (the global one, then
"answer 200") takes over. Without ``times`` a rule lasts until replaced or `reset()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus

from tests.support.loopback import LoopbackServer

__all__ = ["Behaviour", "RecordedRequest", "UpstreamServer", "refusing_port"]

_MAX_HEAD = 64 * 1024


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server read it; `at` is `time.monotonic()` on arrival."""

    method: str
    path: str
    query: str
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value
    body: bytes
    at: float
    raw_headers: list[tuple[str, str]] = field(default_factory=list)  # as sent, in order

    def header_values(self, name: str) -> list[str]:
        """Every value sent for `name` (case-insensitive), in order."""
        return [v for k, v in self.raw_headers if k.lower() == name.lower()]

    def json(self) -> object:
        return json.loads(self.body)


@dataclass
class Behaviour:
    """What the server does with a request that a rule matches."""

    status: int = 200
    delay: float = 0.0
    drop: bool = False
    times: int | None = None  # requests left before the rule expires; None: forever


@dataclass
class _Rules:
    by_path: dict[str, Behaviour] = field(default_factory=dict)
    default: Behaviour | None = None

    def take(self, path: str) -> Behaviour:
        """The behaviour for this request, spending one use of a counted rule."""
        for scope, rule in ((path, self.by_path.get(path)), (None, self.default)):
            if rule is None:
                continue
            if rule.times is not None:
                rule.times -= 1
                if rule.times <= 0:
                    self._drop(scope)
            return rule
        return Behaviour()

    def _drop(self, scope: str | None) -> None:
        if scope is None:
            self.default = None
        else:
            del self.by_path[scope]


class _BadRequest(Exception):
    pass


class UpstreamServer(LoopbackServer):
    """A misbehaving HTTP/1.1 upstream on an ephemeral port of 127.0.0.1."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self.requests: list[RecordedRequest] = []
        self._rules = _Rules()
        self._arrival = asyncio.Event()  # set on every request

    # -- the test's controls ---------------------------------------------------------

    def behave(
        self,
        path: str | None = None,
        *,
        status: int = 200,
        delay: float = 0.0,
        drop: bool = False,
        times: int | None = None,
    ) -> None:
        """Set how requests to `path` (None: every path without a rule of its own) go.

        `delay` seconds pass before answering (or dropping); `drop` closes the
        connection with a reset instead of answering; `times` limits the rule to the
        next so many requests it matches.
        """
        if times is not None and times < 1:
            raise ValueError("times must be at least 1 (or None for 'until changed')")
        rule = Behaviour(status=status, delay=delay, drop=drop, times=times)
        if path is None:
            self._rules.default = rule
        else:
            self._rules.by_path[path] = rule

    def reset(self) -> None:
        """Forget every rule and every recorded request."""
        self._rules = _Rules()
        self.requests.clear()

    def calls(self, path: str | None = None) -> int:
        """How many requests arrived (to `path` only, when given)."""
        if path is None:
            return len(self.requests)
        return sum(1 for r in self.requests if r.path == path)

    def arrivals(self, path: str | None = None) -> list[float]:
        """Monotonic arrival times, in order (of requests to `path`, when given)."""
        return [r.at for r in self.requests if path is None or r.path == path]

    async def wait_for_calls(
        self, count: int, path: str | None = None, *, within: float = 5.0
    ) -> None:
        """Return once at least `count` requests have arrived; TimeoutError after `within` s."""
        async with asyncio.timeout(within):
            while self.calls(path) < count:
                self._arrival.clear()
                await self._arrival.wait()

    # -- the server --------------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                request = await self._read_request(reader)
            except _BadRequest:
                return
            if request is None:
                return  # the client closed a keep-alive connection
            self.requests.append(request)
            self._arrival.set()
            rule = self._rules.take(request.path)
            if rule.delay > 0:
                await asyncio.sleep(rule.delay)
            if rule.drop:
                _reset(writer)
                return
            writer.write(_response(rule.status, request))
            await writer.drain()
            if request.headers.get("connection", "").lower() == "close":
                return

    async def _read_request(self, reader: asyncio.StreamReader) -> RecordedRequest | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return None
            raise
        except asyncio.LimitOverrunError as exc:
            raise _BadRequest("request head too large") from exc
        at = time.monotonic()
        if len(head) > _MAX_HEAD:
            raise _BadRequest("request head too large")
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, _version = lines[0].split(" ", 2)
        except ValueError as exc:
            raise _BadRequest(lines[0]) from exc
        raw_headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                raise _BadRequest(line)
            raw_headers.append((name.strip(), value.strip()))
        headers = {name.lower(): value for name, value in raw_headers}
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = await _read_chunked(reader)
        else:
            body = await reader.readexactly(int(headers.get("content-length", "0") or "0"))
        path, _, query = target.partition("?")
        return RecordedRequest(method, path, query, headers, body, at, raw_headers)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            # Trailers (if any) end with an empty line.
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)


def _response(status: int, request: RecordedRequest) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    payload: dict[str, object] = {"path": request.path, "method": request.method}
    if status < 400:
        payload["ok"] = True
    else:
        payload["error"] = status
    body = json.dumps(payload).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: keep-alive\r\n"
        "\r\n"
    )
    return head.encode("latin-1") + body


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0): the client sees the connection torn down
    after sending its request, with no response at all."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@contextlib.contextmanager
def refusing_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port on `host` where connections are refused: bound (so nothing else takes it
    while the test runs) but never listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()
