"""The Kubernetes channel protocol over WebSocket (``channel.k8s.io`` and its relatives).

Each message carries one channel's bytes behind a channel number: the first byte of a
binary message (``channel.k8s.io``, ``v4.channel.k8s.io``, ``v5.channel.k8s.io``), or
an ASCII digit before base64 text (``base64.channel.k8s.io``, ``v4.base64...``). In v5 a
binary message ``[255, n]`` closes channel ``n`` (half-close: stdin EOF). The framing of
WebSocket itself (masks, fragments, ping/pong, close) is the ``websockets`` library's
Sans-I/O protocol, fed here from the asyncio streams the HTTP server handed over.

In ``raw`` mode (the SPDY tunnel of KEP-4006, ``SPDY/3.1+portforward.k8s.io``) messages
have no channel: every binary message is the next bytes of one stream, read from
``input(0)`` and written with :meth:`WsConnection.send_raw`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib

from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

from moorage import log
from moorage.streaming.idle import IdleReader
from moorage.streaming.inbound import InboundBuffer

_log = log.get("moorage.streaming")

#: The v5 CLOSE signal's channel byte.
CLOSE_SIGNAL = 255
#: Messages we send carry at most this many bytes of one channel.
CHUNK = 32 * 1024
WRITE_HIGH = 256 * 1024
WRITE_HARD_LIMIT = 8 * 1024 * 1024
CHANNEL_BUFFER = 1024 * 1024
#: The largest message accepted from a client.
MAX_MESSAGE = 4 * 1024 * 1024
CLOSE_GRACE = 5.0


class WsInput(InboundBuffer):
    """A channel the client writes (a :class:`~moorage.streaming.api.Reader`)."""

    def __init__(self, max_buffer: int = CHANNEL_BUFFER) -> None:
        super().__init__(max_buffer)

    @property
    def closed(self) -> bool:
        return self.ended


class WsOutput:
    """A channel we write (a :class:`~moorage.streaming.api.Writer`)."""

    def __init__(self, conn: WsConnection, channel: int) -> None:
        self.conn = conn
        self.channel = channel
        self.closed = False

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        for off in range(0, len(view), CHUNK):
            if self.closed or self.conn.is_lost:
                await asyncio.sleep(0)  # dropped; still yield, so a copy loop cannot spin
                return
            await self.conn.send(self.channel, bytes(view[off:off + CHUNK]))

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.conn.close_signal:
                await self.conn.send_raw(bytes((CLOSE_SIGNAL, self.channel)))


class WsConnection(IdleReader):
    """One accepted WebSocket connection speaking the channel protocol; run :meth:`run`."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        protocol: ServerProtocol,
        *,
        base64_codec: bool = False,
        close_signal: bool = False,
        initial: bytes = b"",
        idle_timeout: float | None = None,
        raw: bool = False,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.protocol = protocol
        self.base64 = base64_codec
        self.close_signal = close_signal
        self.raw = raw
        self.idle_timeout = idle_timeout
        self.inputs: dict[int, WsInput] = {}
        self.lost = asyncio.Event()
        self._initial = initial
        self._fragments: list[bytes] = []
        self._fragment_text = False
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self._active = self._loop.time()
        writer.transport.set_write_buffer_limits(high=WRITE_HIGH)

    def input(self, channel: int) -> WsInput:
        return self.inputs.setdefault(channel, WsInput())

    def output(self, channel: int) -> WsOutput:
        return WsOutput(self, channel)

    # -- reading -------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            if self._initial:
                self.protocol.receive_data(self._initial)
                await self._process()
            while self.protocol.state is not State.CLOSED:
                chunk = await self._read()
                if not chunk:
                    self.protocol.receive_eof()
                    await self._process()
                    break
                self.protocol.receive_data(chunk)
                await self._process()
        except (ConnectionError, OSError, TimeoutError):
            pass
        finally:
            self._mark_lost()


    async def _process(self) -> None:
        for event in self.protocol.events_received():
            if isinstance(event, Frame):
                await self._on_frame(event)
        self._flush()
        if self.protocol.close_expected() or self.protocol.state is State.CLOSING:
            # The client closed (we echoed its close): nothing more will come.
            for inp in self.inputs.values():
                inp._end()

    async def _on_frame(self, frame: Frame) -> None:
        if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
            self._fragments = [bytes(frame.data)]
            self._fragment_text = frame.opcode is Opcode.TEXT
        elif frame.opcode is Opcode.CONT:
            self._fragments.append(bytes(frame.data))
        else:
            return  # ping, pong, close: the protocol object answers them
        if not frame.fin:
            return
        message = b"".join(self._fragments)
        self._fragments = []
        await self._on_message(message, self._fragment_text)

    async def _on_message(self, message: bytes, text: bool) -> None:
        if not message:
            return
        if self.raw:
            if text:
                _log.info("websocket.text_in_tunnel")
                self.abort()  # the tunnel carries bytes only (client-go refuses text too)
                return
            await self.input(0)._deliver(message)
            return
        channel, payload = message[0], message[1:]
        if self.close_signal and not text and channel == CLOSE_SIGNAL:
            if payload and payload[0] in self.inputs:
                self.inputs[payload[0]]._end()
            return
        if self.base64:
            channel -= ord("0")
            try:
                payload = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                _log.info("websocket.bad_base64", channel=channel)
                return
        inp = self.inputs.get(channel)
        if inp is not None and payload:
            await inp._deliver(payload)

    # -- writing -------------------------------------------------------------------------

    def _flush(self) -> None:
        for chunk in self.protocol.data_to_send():
            if self.writer.is_closing():
                return
            if chunk:
                if self.writer.transport.get_write_buffer_size() > WRITE_HARD_LIMIT:
                    _log.info("websocket.peer_not_reading")
                    self.abort()
                    return
                self.writer.write(chunk)
                self._active = self._loop.time()
            elif self.writer.can_write_eof():
                self.writer.write_eof()

    async def send(self, channel: int, data: bytes) -> None:
        if self.base64:
            await self._send(b"%d" % channel + base64.b64encode(data), text=True)
        else:
            await self._send(bytes((channel,)) + data, text=False)

    async def send_raw(self, message: bytes) -> None:
        await self._send(message, text=False)

    async def _send(self, message: bytes, *, text: bool) -> None:
        if self.is_lost or self.protocol.state is not State.OPEN:
            await asyncio.sleep(0)
            return
        if text:
            self.protocol.send_text(message)
        else:
            self.protocol.send_binary(message)
        self._flush()
        try:
            await self.writer.drain()
        except (ConnectionError, OSError):
            self._mark_lost()

    def _mark_lost(self) -> None:
        if not self.lost.is_set():
            self.lost.set()
            for inp in self.inputs.values():
                inp._end()

    # -- closing -------------------------------------------------------------------------

    async def close(self, code: int = 1000, reason: str = "", grace: float = CLOSE_GRACE
                    ) -> None:
        """Send a close frame, wait (at most ``grace``) for the client's, close the socket."""
        if self._closing:
            return
        self._closing = True
        for inp in self.inputs.values():
            inp._end()  # nobody reads them any more: never block the read loop on them
        with contextlib.suppress(Exception):
            if self.protocol.state is State.OPEN:
                self.protocol.send_close(code, reason)
                self._flush()
            async with asyncio.timeout(grace):
                await self.writer.drain()
                await self.lost.wait()
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)
        self._mark_lost()

    def abort(self) -> None:
        self.writer.transport.abort()
        self._mark_lost()
