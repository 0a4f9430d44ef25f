"""H1Transport against real local servers: framing, keep-alive, pooling and failures.

Each test runs a raw `asyncio.start_server` on 127.0.0.1 whose handler writes exactly
the bytes the case needs (chunked bodies, bodyless answers, garbage, dropped sockets),
and counts the TCP connections it accepted, so connection reuse is observed from the
server's side rather than from the pool's internals. Every test runs on asyncio's loop
and on uvloop, the loop the services serve on (tests/common/conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass

import httpx
import pytest

from narthex.common.transport import H1Transport, ResponseTooLarge
from narthex.testing.clock import ManualClock
from tests.support.loopback import LoopbackServer
from tests.support.upstream import refusing_port

# Every test is bounded by this, so a framing bug shows as a failure, never a hang.
BOUND = 5.0


@dataclass
class Req:
    """One request as the server read it."""

    conn: int  # which accepted connection (0, 1, ...) carried it
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class Conn:
    """The server's side of one accepted connection."""

    index: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    server: RawServer

    async def read_request(self) -> Req | None:
        """The next request on this connection; None once the client has closed it."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.server.peer_closed(self.index).set()
            return None
        request_line, *lines = head.decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ")
        headers = [
            (name.strip(), value.strip())
            for name, _, value in (line.partition(":") for line in lines if line)
        ]
        length = sum(int(v) for k, v in headers if k.lower() == "content-length")
        body = await self.reader.readexactly(length)
        request = Req(self.index, method, target, headers, body)
        self.server.requests.append(request)
        return request

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def wait_closed_by_peer(self) -> None:
        """Wait until the client closes (reads and discards anything it sends)."""
        with contextlib.suppress(ConnectionError):
            while await self.reader.read(65536):
                pass
        self.server.peer_closed(self.index).set()


Handler = Callable[[Conn], Awaitable[None]]


class RawServer(LoopbackServer):
    """`handler` runs once per accepted connection; the connection closes when it returns."""

    def __init__(self, handler: Handler) -> None:
        super().__init__()
        self.handler = handler
        self.accepted = 0
        self.requests: list[Req] = []
        self._peer_closed: dict[int, asyncio.Event] = {}

    def peer_closed(self, conn: int) -> asyncio.Event:
        """Set once the client has closed connection number `conn`."""
        return self._peer_closed.setdefault(conn, asyncio.Event())

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(self.accepted, reader, writer, self)
        self.accepted += 1
        await self.handler(conn)


def response(
    status: int = 200,
    body: bytes = b"",
    headers: Iterable[tuple[str, str]] = (),
    *,
    length: bool = True,
) -> bytes:
    """An HTTP/1.1 response; `length=False` leaves Content-Length to the caller."""
    lines = [f"HTTP/1.1 {status} Whatever"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    if length:
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


Responder = Callable[[Req], Awaitable[bytes]]


def http(responder: Responder) -> Handler:
    """A keep-alive handler: answer each request with what `responder` returns."""

    async def handle(conn: Conn) -> None:
        while (request := await conn.read_request()) is not None:
            await conn.send(await responder(request))

    return handle


async def echo(request: Req) -> bytes:
    """200 with `method target` as the body."""
    return response(200, f"{request.method} {request.target}".encode())


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[RawServer]:
    async with RawServer(handler) as server:
        yield server


@contextlib.asynccontextmanager
async def client(
    *,
    max_connections: int = 200,
    keepalive_expiry: float = 4.0,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[httpx.AsyncClient]:
    transport = H1Transport(
        max_connections=max_connections, keepalive_expiry=keepalive_expiry, clock=clock
    )
    async with httpx.AsyncClient(transport=transport, timeout=2.0) as http_client:
        yield http_client


# -- keep-alive and pooling --------------------------------------------------------------


async def test_sequential_requests_share_one_connection() -> None:
    async with serving(http(echo)) as server, client() as c, asyncio.timeout(BOUND):
        for i in range(20):
            r = await c.get(f"{server.url}/n/{i}?q={i}")
            assert r.status_code == 200
            assert r.text == f"GET /n/{i}?q={i}"

    assert server.accepted == 1
    assert [req.conn for req in server.requests] == [0] * 20


async def test_concurrent_requests_open_at_most_max_connections() -> None:
    in_flight = peak = 0

    async def slow(request: Req) -> bytes:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.05)
        in_flight -= 1
        return await echo(request)

    async with serving(http(slow)) as server, client(max_connections=3) as c:
        async with asyncio.timeout(BOUND):
            responses = await asyncio.gather(*(c.get(f"{server.url}/c/{i}") for i in range(10)))
        assert [r.text for r in responses] == [f"GET /c/{i}" for i in range(10)]
        # Three were needed at once and all three were then reused for the other seven.
        assert server.accepted == 3
        assert peak <= 3

        # The pool still works (and still reuses) after the burst.
        async with asyncio.timeout(BOUND):
            r = await c.get(f"{server.url}/after")
        assert r.status_code == 200
        assert server.accepted == 3


# -- response framing ----------------------------------------------------------------------


async def test_chunked_and_content_length_bodies_are_read_whole_on_one_connection() -> None:
    async def handle(conn: Conn) -> None:
        await conn.read_request()
        # A chunked body, its head and chunks split across writes (and TCP segments).
        await conn.send(response(200, headers=[("Transfer-Encoding", "chunked")], length=False))
        await asyncio.sleep(0.01)
        await conn.send(b"5\r\nhello\r\n")
        await asyncio.sleep(0.01)
        await conn.send(b"7;ext=1\r\n, world\r\n" + b"0\r\n\r\n")
        await conn.read_request()
        # A Content-Length body in two writes.
        await conn.send(response(200, b"0123456789" * 100)[:-500])
        await asyncio.sleep(0.01)
        await conn.send((b"0123456789" * 100)[-500:])
        await conn.read_request()
        await conn.send(response(200, headers=[("Transfer-Encoding", "chunked")], length=False))
        await conn.send(chunked(b"a" * 70000, b"b"))
        await conn.wait_closed_by_peer()

    async with serving(handle) as server, client() as c, asyncio.timeout(BOUND):
        first = await c.get(f"{server.url}/chunked")
        second = await c.get(f"{server.url}/length")
        third = await c.get(f"{server.url}/big-chunked")

    assert first.status_code == 200
    assert first.content == b"hello, world"
    assert second.content == b"0123456789" * 100
    assert third.content == b"a" * 70000 + b"b"
    assert server.accepted == 1


@pytest.mark.parametrize(
    ("method", "status", "headers"),
    [
        pytest.param("GET", 204, [], id="204"),
        pytest.param("GET", 304, [("Content-Length", "10")], id="304-with-length"),
        pytest.param("HEAD", 200, [("Content-Length", "5")], id="HEAD-with-length"),
    ],
)
async def test_bodyless_responses_complete_and_the_next_request_works(
    method: str, status: int, headers: list[tuple[str, str]]
) -> None:
    async def handle(conn: Conn) -> None:
        while (request := await conn.read_request()) is not None:
            if request.target == "/bodyless":
                await conn.send(response(status, headers=headers, length=False))
            else:
                await conn.send(await echo(request))

    async with serving(handle) as server, client() as c:
        async with asyncio.timeout(2):
            bodyless = await c.request(method, f"{server.url}/bodyless")
        assert bodyless.status_code == status
        assert bodyless.content == b""
        async with asyncio.timeout(2):
            after = await c.get(f"{server.url}/after")
            again = await c.get(f"{server.url}/again")

    assert after.text == "GET /after"
    assert again.text == "GET /again"
    if method == "HEAD":
        # The parser expected a body that never comes: that connection is not reused.
        assert [req.conn for req in server.requests] == [0, 1, 1]
    else:
        assert [req.conn for req in server.requests] == [0, 0, 0]


async def test_connection_close_from_the_server_is_honoured() -> None:
    async def close_every_time(request: Req) -> bytes:
        return response(200, request.target.encode(), [("Connection", "close")])

    async def handle(conn: Conn) -> None:
        request = await conn.read_request()
        assert request is not None
        await conn.send(await close_every_time(request))
        # Returning closes the connection, as the header announced.

    async with serving(handle) as server, client() as c, asyncio.timeout(BOUND):
        texts = [(await c.get(f"{server.url}/{i}")).text for i in range(3)]

    assert texts == ["/0", "/1", "/2"]
    assert server.accepted == 3
    assert [req.conn for req in server.requests] == [0, 1, 2]


async def test_server_closing_an_idle_connection_leads_to_a_fresh_one() -> None:
    async def one_request_then_close_while_idle(conn: Conn) -> None:
        request = await conn.read_request()
        assert request is not None
        await conn.send(await echo(request))  # keep-alive, by every header sent
        await asyncio.sleep(0.05)  # ... then the server gives up on the idle connection

    async with serving(one_request_then_close_while_idle) as server, client() as c:
        async with asyncio.timeout(BOUND):
            first = await c.get(f"{server.url}/first")
            await asyncio.sleep(0.2)  # the close reaches the client while it is idle
            second = await c.get(f"{server.url}/second")

    assert (first.text, second.text) == ("GET /first", "GET /second")
    assert server.accepted == 2


async def test_keepalive_expiry_retires_an_idle_connection() -> None:
    clock = ManualClock(1000.0)
    async with serving(http(echo)) as server, client(keepalive_expiry=0.1, clock=clock) as c:
        async with asyncio.timeout(BOUND):
            await c.get(f"{server.url}/a")
            clock.advance(0.09)
            await c.get(f"{server.url}/b")  # within the expiry: reused
            clock.advance(0.1)
            r = await c.get(f"{server.url}/c")  # idle as long as the expiry: a new one
            await server_saw_close(server, 0)

    assert r.text == "GET /c"
    assert [req.conn for req in server.requests] == [0, 0, 1]


async def server_saw_close(server: RawServer, conn: int) -> None:
    await server.peer_closed(conn).wait()


# -- request framing ---------------------------------------------------------------------------


async def test_post_body_arrives_intact_with_its_length() -> None:
    body = bytes(range(256)) * 400  # 100 KiB, binary, above the single-write threshold
    async with serving(http(echo)) as server, client() as c, asyncio.timeout(BOUND):
        small = await c.post(f"{server.url}/small", content=b'{"x": 1}')
        large = await c.post(f"{server.url}/large", content=body)
        empty = await c.post(f"{server.url}/empty")

    assert (small.status_code, large.status_code, empty.status_code) == (200, 200, 200)
    small_req, large_req, empty_req = server.requests
    assert small_req.body == b'{"x": 1}'
    assert small_req.values("content-length") == ["8"]
    assert large_req.body == body
    assert large_req.values("content-length") == [str(len(body))]
    # A POST without a body still says so: the server must not wait for one.
    assert empty_req.body == b""
    assert empty_req.values("content-length") == ["0"]
    assert server.accepted == 1


async def test_a_streamed_request_body_is_sent_whole() -> None:
    async def parts() -> AsyncIterator[bytes]:
        for part in (b"abc", b"", b"defgh"):
            yield part

    async with serving(http(echo)) as server, client() as c, asyncio.timeout(BOUND):
        streamed = await c.post(f"{server.url}/stream", content=parts())
        multipart = await c.post(f"{server.url}/files", files={"f": ("a.txt", b"file-bytes")})

    assert (streamed.status_code, multipart.status_code) == (200, 200)
    stream_req, files_req = server.requests
    assert stream_req.body == b"abcdefgh"
    assert stream_req.values("content-length") == ["8"]
    assert stream_req.values("transfer-encoding") == []
    assert b"file-bytes" in files_req.body
    assert files_req.values("content-length") == [str(len(files_req.body))]
    assert files_req.values("content-type")[0].startswith("multipart/form-data; boundary=")


async def test_caller_framing_headers_are_replaced_by_the_transports_own() -> None:
    async with serving(http(echo)) as server:
        transport = H1Transport()
        url = httpx.URL(server.url)
        try:
            async with asyncio.timeout(BOUND):
                exchange = await transport.exchange(
                    url,
                    "POST",
                    "/framing?x=1",
                    [
                        (b"Host", b"evil.example"),
                        (b"host", b"evil2.example"),
                        (b"Content-Length", b"999"),
                        (b"Transfer-Encoding", b"chunked"),
                        (b"Connection", b"close"),
                        (b"X-Kept", b"yes"),
                    ],
                    b"payload",
                    {"total": 2.0, "connect": 1.0},
                )
                # The connection stayed open (no caller `Connection: close`): reused.
                again = await transport.exchange(
                    url, "GET", "/again", [], b"", {"total": 2.0, "connect": 1.0}
                )
        finally:
            await transport.aclose()

    assert exchange.status_code == 200
    assert exchange.content == b"POST /framing?x=1"
    assert again.content == b"GET /again"
    request = server.requests[0]
    assert request.values("host") == [f"127.0.0.1:{url.port}"]
    assert request.values("content-length") == ["7"]
    assert request.values("transfer-encoding") == []
    assert request.values("connection") == []
    assert request.values("x-kept") == ["yes"]
    assert request.body == b"payload"
    assert server.accepted == 1

    # The same through httpx, whose own Host and Content-Length the caller overrides.
    async with serving(http(echo)) as server, client() as c, asyncio.timeout(BOUND):
        await c.post(
            f"{server.url}/httpx",
            content=b"12345",
            headers={"Host": "evil.example", "Content-Length": "1", "Connection": "close"},
        )
    (request,) = server.requests
    assert len(request.values("host")) == 1
    assert request.values("host") != ["evil.example"]
    assert request.values("content-length") == ["5"]
    assert request.values("connection") == []
    assert request.body == b"12345"


# -- failures map to httpx's exceptions ----------------------------------------------------------


async def test_nothing_listening_is_a_connect_error() -> None:
    with refusing_port() as port:
        async with client() as c, asyncio.timeout(BOUND):
            with pytest.raises(httpx.ConnectError) as caught:
                await c.get(f"http://127.0.0.1:{port}/")
    assert caught.value.request.url.port == port


@pytest.mark.parametrize("via", ["httpx", "exchange"])
async def test_a_server_that_never_answers_is_a_try_timeout(via: str) -> None:
    async def silent(conn: Conn) -> None:
        await conn.read_request()
        await conn.wait_closed_by_peer()

    async with serving(silent) as server:
        transport = H1Transport()

        async def call() -> object:
            if via == "httpx":
                async with httpx.AsyncClient(transport=transport) as c:
                    return await c.get(f"{server.url}/silent", timeout=0.2)
            url = httpx.URL(server.url)
            return await transport.exchange(url, "GET", "/silent", [], b"", {"total": 0.2})

        start = time.monotonic()
        try:
            async with asyncio.timeout(BOUND):
                with pytest.raises(httpx.ReadTimeout):
                    await call()
                elapsed = time.monotonic() - start
                # The timed-out connection was closed, not kept for the next request.
                await server_saw_close(server, 0)
        finally:
            await transport.aclose()

    # uvloop keeps its timers to the millisecond, so it may fire a hair early.
    assert 0.2 - 0.002 <= elapsed < BOUND  # the timeout ended it, not the silent server


async def test_a_connection_dropped_mid_request_is_a_remote_protocol_error() -> None:
    async def drop(conn: Conn) -> None:
        await conn.read_request()  # then return: the connection closes, nothing sent

    async def drop_mid_body(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(response(200, b"0123456789")[:-5])

    for handler in (drop, drop_mid_body):
        async with serving(handler) as server, client() as c, asyncio.timeout(BOUND):
            with pytest.raises(httpx.RemoteProtocolError):
                await c.get(f"{server.url}/drop")


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"SSH-2.0-OpenSSH_9.6\r\nthis is not http\r\n\r\n", id="garbage"),
        # We never ask to switch protocols: a 101 is as wrong as garbage.
        pytest.param(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\nraw", id="101"),
    ],
)
async def test_garbage_instead_of_http_is_a_remote_protocol_error(answer: bytes) -> None:
    async def garbage(conn: Conn) -> None:
        await conn.read_request()
        await conn.send(answer)
        await conn.wait_closed_by_peer()

    async with serving(garbage) as server, client() as c, asyncio.timeout(BOUND):
        with pytest.raises(httpx.RemoteProtocolError):
            await c.get(f"{server.url}/garbage")
        # The broken connection is closed, not pooled.
        await server_saw_close(server, 0)


async def test_https_is_unsupported() -> None:
    async with client() as c, asyncio.timeout(BOUND):
        with pytest.raises(httpx.UnsupportedProtocol):
            await c.get("https://127.0.0.1:1/")


# -- cancellation ----------------------------------------------------------------------------------


async def test_a_cancelled_request_closes_its_connection_and_the_pool_keeps_working() -> None:
    arrived = asyncio.Event()

    async def handle(conn: Conn) -> None:
        while (request := await conn.read_request()) is not None:
            if request.target == "/slow":
                arrived.set()
                await conn.wait_closed_by_peer()  # never answers; waits for the close
                return
            await conn.send(await echo(request))

    async with serving(handle) as server, client(max_connections=1) as c:
        async with asyncio.timeout(BOUND):
            task = asyncio.create_task(c.get(f"{server.url}/slow"))
            await arrived.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # The cancelled request's connection is closed, not returned to the pool...
            await server_saw_close(server, 0)
            # ... and its slot is free: with max_connections=1 these would hang otherwise.
            first = await c.get(f"{server.url}/next")
            second = await c.get(f"{server.url}/next-again")

    assert (first.text, second.text) == ("GET /next", "GET /next-again")
    assert [req.conn for req in server.requests] == [0, 1, 1]


async def test_a_body_ended_by_closing_the_connection_is_read_whole() -> None:
    async def handle(conn: Conn) -> None:
        assert await conn.read_request() is not None
        # HTTP/1.0-style framing: no Content-Length, no chunking, the close ends it.
        await conn.send(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of the body")

    async with serving(handle) as server, client() as c, asyncio.timeout(BOUND):
        answer = await c.get(f"{server.url}/unframed")
        again = await c.get(f"{server.url}/unframed")

    assert answer.text == "all of the body"
    assert again.text == "all of the body"
    assert server.accepted == 2


@pytest.mark.parametrize("via", ["exchange", "httpx"])
async def test_waiting_for_a_free_connection_is_bounded_by_the_pool_timeout(via: str) -> None:
    """On both paths: `exchange` (the proxy's) and httpx's (`ServiceClient.send`)."""
    release = asyncio.Event()

    async def handle(conn: Conn) -> None:
        assert await conn.read_request() is not None
        await release.wait()
        await conn.send(response(200, b"late"))

    transport = H1Transport(max_connections=1)
    timeouts: dict[str, float | None] = {"total": 5.0, "connect": 1.0, "pool": 0.2}
    through_httpx = httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(5.0, pool=0.2))

    async def get(url: httpx.URL, target: str) -> bytes:
        if via == "exchange":
            return (await transport.exchange(url, "GET", target, [], b"", timeouts)).content
        return (await through_httpx.get(url.join(target))).content

    try:
        async with serving(handle) as server, through_httpx, asyncio.timeout(BOUND):
            url = httpx.URL(server.url)
            busy = asyncio.create_task(get(url, "/busy"))
            await asyncio.sleep(0.05)  # the only connection is now taken
            start = time.monotonic()
            with pytest.raises(httpx.PoolTimeout):
                await get(url, "/waits")
            waited = time.monotonic() - start
            release.set()
            assert await busy == b"late"
    finally:
        await transport.aclose()
    assert 0.15 <= waited < BOUND  # the pool timeout ended the wait, not the release


# -- interim (1xx) responses ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "interim",
    [
        pytest.param(b"HTTP/1.1 100 Continue\r\n\r\n", id="100"),
        pytest.param(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n", id="103"),
        pytest.param(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n", id="100+102"),
    ],
)
@pytest.mark.parametrize("split", [False, True])
async def test_interim_responses_are_skipped_and_the_next_request_gets_its_own_answer(
    interim: bytes, split: bool
) -> None:
    """A 1xx is not the answer: taking it as one would hand the real answer to the next
    request on the connection."""

    async def handle(conn: Conn) -> None:
        while (request := await conn.read_request()) is not None:
            answer = response(200, f"answer to {request.target}".encode(), [("X-Final", "1")])
            if request.target == "/interim":
                if split:  # the interim and the answer in separate segments
                    await conn.send(interim)
                    await asyncio.sleep(0.01)
                    await conn.send(answer)
                else:
                    await conn.send(interim + answer)
            else:
                await conn.send(answer)

    async with serving(handle) as server, client() as c, asyncio.timeout(BOUND):
        first = await c.post(f"{server.url}/interim", content=b"{}")
        second = await c.get(f"{server.url}/next")
        exchange = await H1Transport().exchange(
            httpx.URL(server.url), "GET", "/interim", [], b"", {"total": 2.0}
        )

    assert (first.status_code, first.text) == (200, "answer to /interim")
    assert first.headers["x-final"] == "1"
    assert "link" not in first.headers  # an interim's headers are not the answer's
    assert (second.status_code, second.text) == (200, "answer to /next")
    assert (exchange.status_code, exchange.content) == (200, b"answer to /interim")
    assert server.accepted == 2


# -- response size cap ---------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked", "close-delimited"])
async def test_an_answer_over_the_size_cap_fails_and_its_connection_is_closed(
    framing: str,
) -> None:
    big = b"x" * 5000

    async def handle(conn: Conn) -> None:
        while (request := await conn.read_request()) is not None:
            if request.target != "/big":
                await conn.send(await echo(request))
            elif framing == "content-length":
                await conn.send(response(200, big))
            elif framing == "chunked":
                head = response(200, headers=[("Transfer-Encoding", "chunked")], length=False)
                await conn.send(head + chunked(*(big[i : i + 500] for i in range(0, 5000, 500))))
            else:
                # Neither length nor chunks: the body would end when the server closes,
                # which it leaves to the client here.
                await conn.send(b"HTTP/1.1 200 OK\r\n\r\n" + big)
                break
        await conn.wait_closed_by_peer()

    transport = H1Transport(max_response_bytes=4096)
    try:
        async with (
            serving(handle) as server,
            asyncio.timeout(BOUND),
            httpx.AsyncClient(transport=transport) as c,
        ):
            fits = await c.get(f"{server.url}/small")
            with pytest.raises(ResponseTooLarge):
                await c.get(f"{server.url}/big")
            await server_saw_close(server, 0)  # the rest of it is never read
            after = await c.get(f"{server.url}/after")
    finally:
        await transport.aclose()

    assert fits.text == "GET /small"
    assert after.text == "GET /after"
    assert issubclass(ResponseTooLarge, httpx.RemoteProtocolError)


# -- the request target goes out byte for byte -------------------------------------------------


async def test_the_target_is_written_byte_for_byte() -> None:
    """A raw query string travels as latin-1 text (one character per byte) and must
    leave as the very bytes it arrived as, non-ASCII ones included."""
    raw = b"/q?name=caf\xc3\xa9&b=\xff"
    seen: list[bytes] = []

    async def handle(conn: Conn) -> None:
        head = await conn.reader.readuntil(b"\r\n\r\n")
        seen.append(head.split(b" ")[1])
        await conn.send(response(200, b"ok"))
        await conn.wait_closed_by_peer()

    transport = H1Transport()
    try:
        async with serving(handle) as server, asyncio.timeout(BOUND):
            await transport.exchange(
                httpx.URL(server.url), "GET", raw.decode("latin-1"), [], b"", {"total": 2.0}
            )
    finally:
        await transport.aclose()
    assert seen == [raw]
