"""Slow and malformed clients against a real server: raw sockets on a gateway process.

Every service runs `narthex.common.serve` (uvicorn with `narthex.common.server`'s protocol);
the gateway is the one facing clients, so it is the one started here, twice: once with small
read deadlines and a small head cap, once with a small connection cap. The deadlines come
from settings, as in production. Nothing here asserts a duration: a connection the server
must cut off has to be closed within a bound far above the deadline, that is all.
"""

from __future__ import annotations

import http.client
import re
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing
from dataclasses import replace

import pytest

from tests.support.platform import HOST, Spec, gateway_spec, running
from tests.support.services import Service
from tests.support.upstream import refusing_port

pytestmark = pytest.mark.slow

DEADLINE = 0.3  # seconds: header and body timeouts of the strict gateway
BOUND = 15.0  # a connection the server must close is closed well within this
MAX_HEADER_BYTES = 2048
MAX_CONNECTIONS = 4


def gateway(label: str, nowhere: str, **settings: str) -> Spec:
    """A gateway whose upstreams are all `nowhere`: never ready, but live."""
    spec = gateway_spec(label, nowhere, nowhere, tracing="false", **settings)
    return replace(spec, ready_path="/healthz")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Service]]:
    with ExitStack() as stack:
        nowhere = f"http://{HOST}:{stack.enter_context(refusing_port())}"
        strict = gateway(
            "strict",
            nowhere,
            header_timeout=str(DEADLINE),
            body_timeout=str(DEADLINE),
            max_header_bytes=str(MAX_HEADER_BYTES),
        )
        capped = gateway("capped", nowhere, max_connections=str(MAX_CONNECTIONS))
        started = stack.enter_context(running([strict, capped], tmp_path_factory.mktemp("srv")))
        yield started[0], started[1]


def connect(service: Service) -> socket.socket:
    host, port = service.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=BOUND)
    sock.settimeout(BOUND)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes; socket.timeout (a failure) past BOUND."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def trickle_until_closed(sock: socket.socket, data: bytes, pause: float = 0.05) -> bytes:
    """Send `data` a byte at a time (slowloris) until the server closes the connection; what
    it answered. Fails if the server still reads after BOUND seconds."""
    deadline = time.monotonic() + BOUND
    sock.settimeout(pause)
    received = b""
    for byte in data:
        assert time.monotonic() < deadline, "the server let a slow client hold it"
        try:
            sock.sendall(bytes([byte]))
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
        if not chunk:
            break
        received += chunk
    else:
        pytest.fail("the whole slow request was read; the server never cut it off")
    sock.settimeout(BOUND)
    try:
        return received + read_until_closed(sock)
    except ConnectionResetError:
        return received


def read_response(sock: socket.socket) -> bytes:
    """One whole response (head and Content-Length body) on a kept-alive connection."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, "closed before answering"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = re.search(rb"(?i)content-length: *(\d+)", head)
    assert length is not None
    while len(body) < int(length.group(1)):
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


# -- deadlines ------------------------------------------------------------------------------


def test_a_connection_that_sends_nothing_is_closed(servers: tuple[Service, Service]) -> None:
    with closing(connect(servers[0])) as sock:
        assert read_until_closed(sock) == b""  # closed, silently: there was no request


def test_a_head_sent_a_byte_at_a_time_is_cut_off_with_408(
    servers: tuple[Service, Service],
) -> None:
    endless_head = b"GET /healthz HTTP/1.1\r\nHost: gw\r\n" + b"X-Slow: " + b"a" * 100_000
    with closing(connect(servers[0])) as sock:
        response = trickle_until_closed(sock, endless_head)
    assert status_of(response) == 408
    assert b"connection: close" in response


def test_a_later_request_on_a_kept_alive_connection_has_the_same_deadline(
    servers: tuple[Service, Service],
) -> None:
    with closing(connect(servers[0])) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert status_of(read_response(sock)) == 200
        response = trickle_until_closed(sock, b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 100_000)
    assert status_of(response) == 408


@pytest.mark.parametrize(
    "head",
    [
        # The token exchange is public and reads its body (read_body) before anything else.
        b"POST /v1/auth/token HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n",
        # Not a proxied route: the gateway's own app reads it, as every service reads bodies.
        b"POST /v1/own HTTP/1.1\r\nHost: gw\r\n",
    ],
    ids=["proxied", "the app's own"],
)
def test_a_body_sent_a_byte_at_a_time_is_cut_off_with_408(
    servers: tuple[Service, Service], head: bytes
) -> None:
    with closing(connect(servers[0])) as sock:
        sock.sendall(head + b"Content-Length: 100000\r\n\r\n")
        response = trickle_until_closed(sock, b"x" * 100_000)
    assert status_of(response) == 408
    assert b"Request body not received in time" in response
    assert response.count(b"HTTP/1.1 ") == 1  # the app's own answer went nowhere


def test_a_body_still_arriving_after_the_answer_is_not_drained_forever(
    servers: tuple[Service, Service],
) -> None:
    # /healthz never reads a body: it answers at once, and the body keeps trickling in.
    head = b"GET /healthz HTTP/1.1\r\nHost: gw\r\nContent-Length: 100000\r\n\r\n"
    with closing(connect(servers[0])) as sock:
        sock.sendall(head)
        response = trickle_until_closed(sock, b"x" * 100_000)
    assert status_of(response) == 200


def test_a_busy_kept_alive_connection_outlives_the_deadlines(
    servers: tuple[Service, Service],
) -> None:
    # Each request moves the deadline; none is charged for the time of those before it.
    with closing(connect(servers[0])) as sock:
        started = time.monotonic()
        served = 0
        while time.monotonic() - started < 4 * DEADLINE:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
            assert status_of(read_response(sock)) == 200
            served += 1
            time.sleep(DEADLINE / 6)
    assert served >= 4


def test_a_head_larger_than_the_cap_is_431(servers: tuple[Service, Service]) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"a" * (2 * MAX_HEADER_BYTES)
    with closing(connect(servers[0])) as sock:
        sock.sendall(head)
        response = read_until_closed(sock)
    assert status_of(response) == 431


def test_well_behaved_clients_are_served_as_before(servers: tuple[Service, Service]) -> None:
    host, port = servers[0].url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=BOUND)
    try:
        for _ in range(3):  # one kept-alive connection
            connection.request("GET", "/healthz")
            response = connection.getresponse()
            assert (response.status, response.read()) == (200, b'{"status":"ok"}')
        # A body read whole and forwarded: to an auth service that is not there here.
        connection.request("POST", "/v1/auth/token", body=b"{}", headers={"X-API-Key": "nx_x"})
        assert connection.getresponse().status == 503
    finally:
        connection.close()


# -- the connection cap ---------------------------------------------------------------------


def test_connections_past_the_cap_get_503_and_the_cap_frees_up(
    servers: tuple[Service, Service],
) -> None:
    capped = servers[1]
    held = [connect(capped) for _ in range(MAX_CONNECTIONS)]
    try:
        # Each held connection is admitted (it answers) and stays open.
        for sock in held:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
            assert status_of(read_response(sock)) == 200
        with closing(connect(capped)) as extra:
            response = read_until_closed(extra)
        assert status_of(response) == 503
        assert b"retry-after: 1" in response
    finally:
        for sock in held:
            sock.close()
    # Closed connections no longer count (the server notices the close asynchronously).
    deadline = time.monotonic() + BOUND
    while True:
        with closing(connect(capped)) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
            if status_of(read_until_closed(sock)) == 200:
                break
        assert time.monotonic() < deadline, "the cap never freed up"
        time.sleep(0.05)
