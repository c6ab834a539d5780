"""A SPDY/3.1 server connection on asyncio streams: the peer opens streams, we answer.

What it does, as Go's spdystream (the client kubelet, kubectl and crictl use) expects:

- every SYN_STREAM gets a SYN_REPLY with an empty header block at once, or RST_STREAM
  REFUSED_STREAM when the ``on_stream`` callback declines it (or after GOAWAY);
- DATA is queued per stream up to ``max_stream_buffer`` bytes; past that the connection
  stops reading until the stream's reader catches up (no flow control frames: spdystream
  never sends WINDOW_UPDATE, so none are enforced or sent, and SETTINGS are ignored);
- data written to a stream goes out in DATA frames of at most :data:`CHUNK` bytes, and a
  writer waits while the socket's send buffer is above :data:`WRITE_HIGH`; a peer that
  makes control frames (PING echoes) pile up past :data:`WRITE_HARD_LIMIT` is dropped;
- PING with an odd (client) id is echoed; GOAWAY stops new streams; a stream that is
  reset, or a connection that is gone, swallows writes (sessions end on :attr:`lost`);
- :meth:`SpdyConnection.close` sends GOAWAY, half-closes and gives the peer a moment to
  read before the socket goes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from moorage import log
from moorage.streaming.idle import IdleReader
from moorage.streaming.inbound import InboundBuffer
from moorage.streaming.spdy import frames
from moorage.streaming.spdy.frames import GoAwayStatus, ProtocolError, RstStatus
from moorage.streaming.spdy.headers import Compressor, Decompressor, HeaderMap

_log = log.get("moorage.streaming")

#: DATA frames we send carry at most this much.
CHUNK = 32 * 1024
#: Writers wait while more than this is waiting in the socket's send buffer.
WRITE_HIGH = 256 * 1024
#: A peer that lets this much pile up (control frames are written without waiting) is cut.
WRITE_HARD_LIMIT = 8 * 1024 * 1024
#: Bytes of one stream's input kept for its reader before the connection stops reading.
STREAM_BUFFER = 1024 * 1024
#: How long close() lets the peer read what was sent before the socket is closed.
CLOSE_GRACE = 5.0


class SpdyStream(InboundBuffer):
    """One stream opened by the peer: a :class:`~moorage.streaming.api.Reader` of its data
    and a :class:`~moorage.streaming.api.Writer` of ours."""

    def __init__(self, conn: SpdyConnection, stream_id: int, headers: HeaderMap,
                 max_buffer: int) -> None:
        super().__init__(max_buffer)
        self.conn = conn
        self.id = stream_id
        self.headers = headers
        self.local_closed = False  # FIN sent
        self.reset = False

    def __repr__(self) -> str:
        return f"SpdyStream({self.id}, {self.header('streamtype')!r})"

    def header(self, name: str) -> str:
        values = self.headers.get(name.lower())
        return values[0] if values else ""

    # -- input ---------------------------------------------------------------------------

    @property
    def remote_closed(self) -> bool:
        """FIN or RST received (or the connection is gone)."""
        return self.ended

    @remote_closed.setter
    def remote_closed(self, value: bool) -> None:
        self.ended = value

    def _end_input(self) -> None:
        self._end()

    # -- output --------------------------------------------------------------------------

    @property
    def writable(self) -> bool:
        return not (self.local_closed or self.reset or self.conn.is_lost)

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        for off in range(0, len(view), CHUNK):
            if not self.writable:
                await asyncio.sleep(0)  # dropped; still yield, so a copy loop cannot spin
                return
            await self.conn._send_data(self.id, bytes(view[off:off + CHUNK]))

    async def close(self) -> None:
        if self.writable:
            self.local_closed = True
            self.conn._send_control(frames.data(self.id, b"", fin=True))
        self.conn._forget_if_done(self)

    def send_reset(self, status: int = RstStatus.CANCEL) -> None:
        if not self.reset and not self.conn.is_lost:
            self.conn._send_control(frames.rst_stream(self.id, status))
        self._on_reset()

    def _on_reset(self) -> None:
        self.reset = True
        self._end_input()
        self.conn.streams.pop(self.id, None)


class SpdyConnection(IdleReader):
    """The server side of one upgraded connection; run :meth:`run` in a task."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_stream: Callable[[SpdyStream], bool],
        *,
        initial: bytes = b"",
        idle_timeout: float | None = None,
        max_stream_buffer: int = STREAM_BUFFER,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.on_stream = on_stream
        self.idle_timeout = idle_timeout
        self.max_stream_buffer = max_stream_buffer
        self.streams: dict[int, SpdyStream] = {}
        self.lost = asyncio.Event()
        self._initial = initial
        self._parser = frames.FrameParser()
        self._compressor = Compressor()
        self._decompressor = Decompressor()
        self._last_peer_id = 0
        self._peer_gone_away = False
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self._active = self._loop.time()
        transport = writer.transport
        transport.set_write_buffer_limits(high=WRITE_HIGH)

    # -- reading -------------------------------------------------------------------------

    async def run(self) -> None:
        """Read and handle frames until the peer closes, breaks the protocol, or idles out."""
        try:
            if self._initial:
                await self._feed(self._initial)
            while True:
                chunk = await self._read()
                if not chunk:
                    break
                await self._feed(chunk)
        except ProtocolError as e:
            _log.info("spdy.protocol_error", error=str(e))
            self._send_control(frames.goaway(self._last_peer_id, GoAwayStatus.PROTOCOL_ERROR))
        except (ConnectionError, OSError, TimeoutError):
            pass
        finally:
            self._mark_lost()


    async def _feed(self, chunk: bytes) -> None:
        for frame in self._parser.feed(chunk):
            await self._handle(frame)

    async def _handle(self, frame: frames.Frame) -> None:
        if isinstance(frame, frames.Data):
            stream = self.streams.get(frame.stream_id)
            if stream is None:
                return  # gone (reset, or finished): dropped, as spdystream does
            if frame.data:
                await stream._deliver(frame.data)
            if frame.fin:
                stream._end_input()
                self._forget_if_done(stream)
        elif isinstance(frame, frames.SynStream):
            self._on_syn_stream(frame)
        elif isinstance(frame, (frames.SynReply, frames.Headers)):
            self._decompressor.decompress(frame.header_block)  # keeps the context in step
            stream = self.streams.get(frame.stream_id)
            if stream is not None and frame.fin:
                stream._end_input()
                self._forget_if_done(stream)
        elif isinstance(frame, frames.RstStream):
            stream = self.streams.get(frame.stream_id)
            if stream is not None:
                stream._on_reset()
        elif isinstance(frame, frames.Ping):
            if frame.ping_id & 1:  # the peer's; even ids would answer ours (we send none)
                self._send_control(frames.ping(frame.ping_id))
        elif isinstance(frame, frames.GoAway):
            self._peer_gone_away = True
        # SETTINGS, WINDOW_UPDATE and unknown control frames are ignored.

    def _on_syn_stream(self, frame: frames.SynStream) -> None:
        headers = self._decompressor.decompress(frame.header_block)
        sid = frame.stream_id
        if sid % 2 == 0 or sid <= self._last_peer_id:
            self._send_control(frames.rst_stream(sid, RstStatus.PROTOCOL_ERROR))
            return
        self._last_peer_id = sid
        if self._peer_gone_away or self._closing:
            self._send_control(frames.rst_stream(sid, RstStatus.REFUSED_STREAM))
            return
        stream = SpdyStream(self, sid, headers, self.max_stream_buffer)
        if frame.fin or frame.unidirectional:
            stream.remote_closed = True
        if frame.unidirectional:
            stream.local_closed = True
        self.streams[sid] = stream
        try:
            accepted = self.on_stream(stream)
        except Exception:
            _log.exception("spdy.on_stream_failed", stream_id=sid)
            accepted = False
        if not accepted:
            stream.send_reset(RstStatus.REFUSED_STREAM)
            return
        self._send_control(frames.syn_reply(sid, self._compressor.compress({})))

    # -- writing -------------------------------------------------------------------------

    def _send_control(self, raw: bytes) -> None:
        if self.is_lost or self.writer.is_closing():
            return
        if self.writer.transport.get_write_buffer_size() > WRITE_HARD_LIMIT:
            _log.info("spdy.peer_not_reading", buffered=self.writer.transport
                      .get_write_buffer_size())
            self.abort()
            return
        self.writer.write(raw)
        self._active = self._loop.time()

    async def _send_data(self, stream_id: int, chunk: bytes) -> None:
        if self.is_lost or self.writer.is_closing():
            await asyncio.sleep(0)
            return
        self.writer.write(frames.data(stream_id, chunk))
        self._active = self._loop.time()
        try:
            await self.writer.drain()
        except (ConnectionError, OSError):
            self._mark_lost()

    def _forget_if_done(self, stream: SpdyStream) -> None:
        if stream.remote_closed and (stream.local_closed or stream.reset):
            self.streams.pop(stream.id, None)

    def _mark_lost(self) -> None:
        if self.lost.is_set():
            return
        self.lost.set()
        for stream in list(self.streams.values()):
            stream._end_input()

    # -- closing -------------------------------------------------------------------------

    async def close(self, status: int = GoAwayStatus.OK, grace: float = CLOSE_GRACE) -> None:
        """GOAWAY, flush, half-close, wait (at most ``grace``) for the peer to hang up."""
        if self._closing:
            return
        self._closing = True
        for stream in list(self.streams.values()):
            stream.discard_input()  # nobody reads them any more: never block the read loop
        self._send_control(frames.goaway(self._last_peer_id, status))
        with contextlib.suppress(Exception):
            async with asyncio.timeout(grace):
                await self.writer.drain()
                if self.writer.can_write_eof() and not self.writer.is_closing():
                    self.writer.write_eof()
                await self.lost.wait()
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 1.0)
        self._mark_lost()

    def abort(self) -> None:
        self.writer.transport.abort()
        self._mark_lost()
