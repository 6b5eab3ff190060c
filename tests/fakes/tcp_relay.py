"""A loopback TCP relay that can fall silent, for faults a real server cannot make itself.

``silence()`` makes every connection open at that moment a half-open one: both ends stay
connected and can write, but nothing reaches the other side any more, as when a NAT or a
load balancer forgets an idle flow. Connections made afterwards pass again. Every task and
transport it made is closed by ``aclose``.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

_CHUNK = 65536


@dataclass
class _Pair:
    silent: bool = False
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    pumps: list[asyncio.Task[None]] = field(default_factory=list)


class TcpRelay:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._pairs: list[_Pair] = []
        self.port = 0

    async def start(self) -> TcpRelay:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def silence(self) -> int:
        """Let nothing more through on the connections open now; how many there are."""
        for pair in self._pairs:
            pair.silent = True
        return len(self._pairs)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*self._target)
        pair = _Pair(writers=[client_w, server_w])
        pair.pumps = [
            asyncio.create_task(self._pump(pair, client_r, server_w)),
            asyncio.create_task(self._pump(pair, server_r, client_w)),
        ]
        self._pairs.append(pair)

    @staticmethod
    async def _pump(
        pair: _Pair, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while data := await reader.read(_CHUNK):
            if not pair.silent:  # silent: read and dropped, so the sender never blocks
                writer.write(data)
                await writer.drain()
        if not pair.silent:
            writer.close()  # a real close is relayed; a silent flow never says goodbye

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()  # no new connections; wait_closed after the open ones
        for pair in self._pairs:
            for task in pair.pumps:
                task.cancel()
            await asyncio.gather(*pair.pumps, return_exceptions=True)
            for writer in pair.writers:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
        self._pairs.clear()
        if self._server is not None:
            await self._server.wait_closed()
