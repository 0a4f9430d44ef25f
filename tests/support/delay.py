"""A TCP proxy on loopback that adds a delay the test can change: a slow upstream, for real."""

from __future__ import annotations

import asyncio
import contextlib

from tests.support.loopback import LoopbackServer

__all__ = ["DelayProxy"]


class DelayProxy(LoopbackServer):
    """Forwards every connection to `target_port`, holding each answer chunk `delay` s
    (settable while running), so requests see a slow service without changing it."""

    def __init__(self, target_port: int, *, delay: float = 0.0) -> None:
        super().__init__()
        self.target_port = target_port
        self.delay = delay

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, delayed=False),
                self._pipe(up_reader, writer, delayed=True),
            )
        finally:
            up_writer.close()
            with contextlib.suppress(OSError):
                await up_writer.wait_closed()

    async def _pipe(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, delayed: bool
    ) -> None:
        while data := await source.read(65536):
            if delayed and self.delay:
                await asyncio.sleep(self.delay)
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
