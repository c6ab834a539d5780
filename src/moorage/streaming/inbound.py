"""The bounded buffer of what a client sends on one stream or channel, read by a backend."""

from __future__ import annotations

import asyncio
from collections import deque


class InboundBuffer:
    """Chunks delivered by the connection's read loop, read by the exec/attach/forward side.

    At most ``max_buffer`` bytes wait: a full buffer makes the read loop wait (the client
    then waits on TCP), so a slow container never makes the daemon buffer without bound.
    """

    def __init__(self, max_buffer: int) -> None:
        self._max = max_buffer
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._readable = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.ended = False  # the client closed its side (or the connection is gone)
        self._discard = False

    def discard_input(self) -> None:
        """Nobody reads this input: drop what the client sends on it."""
        self._discard = True
        self._chunks.clear()
        self._size = 0
        self._room.set()

    async def read(self) -> bytes:
        """The next chunk, or b"" once the client's side ended and all was read."""
        while not self._chunks:
            if self.ended:
                return b""
            self._readable.clear()
            await self._readable.wait()
        data = self._chunks.popleft()
        self._size -= len(data)
        if self._size < self._max:
            self._room.set()
        return data

    async def _deliver(self, data: bytes) -> None:
        while self._size >= self._max and not (self.ended or self._discard):
            self._room.clear()
            await self._room.wait()
        if self.ended or self._discard or not data:
            return
        self._chunks.append(data)
        self._size += len(data)
        self._readable.set()

    def _end(self) -> None:
        self.ended = True
        self._readable.set()
        self._room.set()
