"""Reading a streaming connection with an idle timeout that writes also keep alive."""

from __future__ import annotations

import asyncio

READ_SIZE = 64 * 1024


class IdleReader:
    """Mixin for a connection: ``_read`` returns the next chunk, or raises TimeoutError once
    nothing was read or written for ``idle_timeout`` seconds (writers touch ``_active``)."""

    reader: asyncio.StreamReader
    idle_timeout: float | None
    lost: asyncio.Event  # set once the connection is gone
    _active: float
    _loop: asyncio.AbstractEventLoop

    @property
    def is_lost(self) -> bool:
        return self.lost.is_set()

    async def _read(self) -> bytes:
        while True:
            timeout = None
            if self.idle_timeout:
                timeout = self._active + self.idle_timeout - self._loop.time()
                if timeout <= 0:
                    raise TimeoutError("idle")
            try:
                async with asyncio.timeout(timeout):
                    chunk = await self.reader.read(READ_SIZE)
            except TimeoutError:
                continue  # the loop decides whether writes kept it alive
            self._active = self._loop.time()
            return chunk
