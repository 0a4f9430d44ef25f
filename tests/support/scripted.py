"""A real loopback upstream that answers exactly what the test scripts, and records requests."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from tests.support.loopback import LoopbackServer
from tests.support.upstream import RecordedRequest


@dataclass
class Reply:
    status: int = 200
    headers: list[tuple[str, str]] = field(
        default_factory=lambda: [("Content-Type", "application/json")]
    )
    body: bytes = b'{"ok": true}'
    chunked: bool = False  # send the body chunked (the test adds Transfer-Encoding)

    def encode(self) -> bytes:
        lines = [f"HTTP/1.1 {self.status} Whatever", *(f"{k}: {v}" for k, v in self.headers)]
        if self.chunked:
            half = len(self.body) // 2
            parts = [p for p in (self.body[:half], self.body[half:]) if p]
            body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
        else:
            lines.append(f"Content-Length: {len(self.body)}")
            body = self.body
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class ScriptedUpstream(LoopbackServer):
    """A keep-alive HTTP/1.1 server on 127.0.0.1 answering every request with `reply`."""

    def __init__(self, reply: Reply | None = None) -> None:
        super().__init__()
        self.reply = reply or Reply()
        self.requests: list[RecordedRequest] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *lines = head.decode("latin-1").split("\r\n")
            method, target, _ = request_line.split(" ")
            raw = [(k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines if ln)]
            headers = {k.lower(): v for k, v in raw}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            path, _, query = target.partition("?")
            self.requests.append(
                RecordedRequest(method, path, query, headers, body, time.monotonic(), raw)
            )
            writer.write(self.reply.encode())
            await writer.drain()
