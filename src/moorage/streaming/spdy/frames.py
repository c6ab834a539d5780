"""SPDY/3 frames: encoding, and an incremental parser. Bytes in, bytes out; no I/O.

Layout (all integers big-endian; draft-mbelshe-httpbis-spdy-00 section 2.2):

- control frame: ``1 | version(15) | type(16)``, ``flags(8) | length(24)``, payload;
- data frame: ``0 | stream_id(31)``, ``flags(8) | length(24)``, payload.

Header blocks travel compressed inside SYN_STREAM, SYN_REPLY and HEADERS; this module
carries them as opaque bytes (:mod:`.headers` compresses and decompresses them, with one
zlib context per direction of a connection, so blocks must be handled in arrival order).

The parser hands out DATA payloads as they arrive, in pieces (:class:`Data` with
``last``), so a 16 MiB frame never has to sit in memory whole; control frames are
buffered up to :data:`MAX_CONTROL_LENGTH`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

VERSION = 3
#: The largest length a frame header can carry.
MAX_LENGTH = (1 << 24) - 1
#: Control frames longer than this are a protocol error here (they carry headers only).
MAX_CONTROL_LENGTH = 1 << 20

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02


class Type(enum.IntEnum):
    SYN_STREAM = 1
    SYN_REPLY = 2
    RST_STREAM = 3
    SETTINGS = 4
    PING = 6
    GOAWAY = 7
    HEADERS = 8
    WINDOW_UPDATE = 9


class RstStatus(enum.IntEnum):
    PROTOCOL_ERROR = 1
    INVALID_STREAM = 2
    REFUSED_STREAM = 3
    UNSUPPORTED_VERSION = 4
    CANCEL = 5
    INTERNAL_ERROR = 6
    FLOW_CONTROL_ERROR = 7
    STREAM_IN_USE = 8
    STREAM_ALREADY_CLOSED = 9
    FRAME_TOO_LARGE = 11


class GoAwayStatus(enum.IntEnum):
    OK = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


class ProtocolError(Exception):
    """The peer sent bytes that are not SPDY/3 (the connection cannot go on)."""


# -- frames --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    """A piece of a DATA frame's payload; ``last`` on the frame's final piece (``fin`` is
    only ever set there)."""

    stream_id: int
    data: bytes
    fin: bool = False
    last: bool = True


@dataclass(frozen=True)
class SynStream:
    stream_id: int
    associated_id: int
    priority: int
    slot: int
    header_block: bytes
    fin: bool = False
    unidirectional: bool = False


@dataclass(frozen=True)
class SynReply:
    stream_id: int
    header_block: bytes
    fin: bool = False


@dataclass(frozen=True)
class RstStream:
    stream_id: int
    status: int


@dataclass(frozen=True)
class Settings:
    #: (flags, id, value) per entry.
    entries: tuple[tuple[int, int, int], ...]
    flags: int = 0


@dataclass(frozen=True)
class Ping:
    ping_id: int


@dataclass(frozen=True)
class GoAway:
    last_good_stream_id: int
    status: int


@dataclass(frozen=True)
class Headers:
    stream_id: int
    header_block: bytes
    fin: bool = False


@dataclass(frozen=True)
class WindowUpdate:
    stream_id: int
    delta: int


@dataclass(frozen=True)
class UnknownControl:
    """A control frame of a type SPDY/3 does not define (to be ignored, as the spec says)."""

    type: int
    flags: int
    payload: bytes


Frame = (Data | SynStream | SynReply | RstStream | Settings | Ping | GoAway | Headers
         | WindowUpdate | UnknownControl)

# -- encoding ------------------------------------------------------------------------------

_U32 = struct.Struct(">I")
_U32x2 = struct.Struct(">II")


def _control(kind: int, flags: int, payload: bytes) -> bytes:
    if len(payload) > MAX_LENGTH:
        raise ValueError(f"control frame payload of {len(payload)} bytes is too long")
    return _U32x2.pack(0x80000000 | (VERSION << 16) | kind, (flags << 24) | len(payload)) + payload


def _stream_id(stream_id: int) -> int:
    if not 0 < stream_id <= 0x7FFFFFFF:
        raise ValueError(f"stream id {stream_id} is out of range")
    return stream_id


def data(stream_id: int, payload: bytes, fin: bool = False) -> bytes:
    if len(payload) > MAX_LENGTH:
        raise ValueError(f"data frame payload of {len(payload)} bytes is too long")
    flags = FLAG_FIN if fin else 0
    return _U32x2.pack(_stream_id(stream_id), (flags << 24) | len(payload)) + payload


def syn_stream(stream_id: int, header_block: bytes, *, associated_id: int = 0,
               priority: int = 0, slot: int = 0, fin: bool = False,
               unidirectional: bool = False) -> bytes:
    flags = (FLAG_FIN if fin else 0) | (FLAG_UNIDIRECTIONAL if unidirectional else 0)
    head = _U32x2.pack(_stream_id(stream_id), associated_id & 0x7FFFFFFF)
    head += bytes(((priority & 0x7) << 5, slot & 0xFF))
    return _control(Type.SYN_STREAM, flags, head + header_block)


def syn_reply(stream_id: int, header_block: bytes, fin: bool = False) -> bytes:
    return _control(Type.SYN_REPLY, FLAG_FIN if fin else 0,
                    _U32.pack(_stream_id(stream_id)) + header_block)


def rst_stream(stream_id: int, status: int) -> bytes:
    return _control(Type.RST_STREAM, 0, _U32x2.pack(_stream_id(stream_id), status))


def settings(entries: tuple[tuple[int, int, int], ...] = (), flags: int = 0) -> bytes:
    payload = _U32.pack(len(entries)) + b"".join(
        _U32x2.pack(((f & 0xFF) << 24) | (i & 0xFFFFFF), v) for f, i, v in entries)
    return _control(Type.SETTINGS, flags, payload)


def ping(ping_id: int) -> bytes:
    return _control(Type.PING, 0, _U32.pack(ping_id))


def goaway(last_good_stream_id: int, status: int = GoAwayStatus.OK) -> bytes:
    return _control(Type.GOAWAY, 0, _U32x2.pack(last_good_stream_id & 0x7FFFFFFF, status))


def headers(stream_id: int, header_block: bytes, fin: bool = False) -> bytes:
    return _control(Type.HEADERS, FLAG_FIN if fin else 0,
                    _U32.pack(_stream_id(stream_id)) + header_block)


def window_update(stream_id: int, delta: int) -> bytes:
    return _control(Type.WINDOW_UPDATE, 0, _U32x2.pack(_stream_id(stream_id), delta))


# -- parsing -------------------------------------------------------------------------------


def _parse_control(kind: int, flags: int, p: bytes) -> Frame:
    fin = bool(flags & FLAG_FIN)

    def need(n: int) -> None:
        if len(p) < n:
            raise ProtocolError(f"{_name(kind)} frame of {len(p)} bytes is too short")

    if kind == Type.SYN_STREAM:
        need(10)
        sid, assoc = _U32x2.unpack_from(p)
        sid &= 0x7FFFFFFF
        if sid == 0:
            raise ProtocolError("SYN_STREAM with stream id 0")
        return SynStream(sid, assoc & 0x7FFFFFFF, p[8] >> 5, p[9], p[10:], fin,
                         bool(flags & FLAG_UNIDIRECTIONAL))
    if kind in (Type.SYN_REPLY, Type.HEADERS):
        need(4)
        sid = _U32.unpack_from(p)[0] & 0x7FFFFFFF
        if sid == 0:
            raise ProtocolError(f"{_name(kind)} with stream id 0")
        cls = SynReply if kind == Type.SYN_REPLY else Headers
        return cls(sid, p[4:], fin)
    if kind == Type.RST_STREAM:
        need(8)
        sid, status = _U32x2.unpack_from(p)
        if sid & 0x7FFFFFFF == 0:
            raise ProtocolError("RST_STREAM with stream id 0")
        return RstStream(sid & 0x7FFFFFFF, status)
    if kind == Type.SETTINGS:
        need(4)
        count = _U32.unpack_from(p)[0]
        if len(p) != 4 + 8 * count:
            raise ProtocolError(f"SETTINGS of {len(p)} bytes cannot hold {count} entries")
        entries = []
        for off in range(4, len(p), 8):
            word, value = _U32x2.unpack_from(p, off)
            entries.append((word >> 24, word & 0xFFFFFF, value))
        return Settings(tuple(entries), flags)
    if kind == Type.PING:
        need(4)
        return Ping(_U32.unpack_from(p)[0])
    if kind == Type.GOAWAY:
        need(8)
        last, status = _U32x2.unpack_from(p)
        return GoAway(last & 0x7FFFFFFF, status)
    if kind == Type.WINDOW_UPDATE:
        need(8)
        sid, delta = _U32x2.unpack_from(p)
        return WindowUpdate(sid & 0x7FFFFFFF, delta & 0x7FFFFFFF)
    return UnknownControl(kind, flags, p)


def _name(kind: int) -> str:
    try:
        return Type(kind).name
    except ValueError:
        return f"type {kind}"


class FrameParser:
    """Turns a byte stream into frames, as the bytes come (see the module doc)."""

    def __init__(self, max_control_length: int = MAX_CONTROL_LENGTH) -> None:
        self.max_control_length = max_control_length
        self._buf = bytearray()
        # The DATA frame being read: (stream id, flags, bytes still to come).
        self._data: tuple[int, int, int] | None = None

    def feed(self, chunk: bytes) -> list[Frame]:
        """Frames completed (and DATA pieces received) by ``chunk``, in order.

        :class:`ProtocolError` when the stream is not SPDY/3; the parser is then unusable.
        """
        self._buf += chunk
        out: list[Frame] = []
        while True:
            if self._data is not None:
                sid, flags, left = self._data
                if not self._buf and left:
                    return out
                piece = bytes(self._buf[:left])
                del self._buf[:len(piece)]
                left -= len(piece)
                last = left == 0
                out.append(Data(sid, piece, fin=last and bool(flags & FLAG_FIN), last=last))
                self._data = None if last else (sid, flags, left)
                continue
            if len(self._buf) < 8:
                return out
            word, size = _U32x2.unpack_from(self._buf)
            flags, length = size >> 24, size & 0xFFFFFF
            if not word & 0x80000000:
                sid = word & 0x7FFFFFFF
                if sid == 0:
                    raise ProtocolError("DATA frame with stream id 0")
                del self._buf[:8]
                self._data = (sid, flags, length)
                if length == 0:
                    out.append(Data(sid, b"", fin=bool(flags & FLAG_FIN), last=True))
                    self._data = None
                continue
            version, kind = (word >> 16) & 0x7FFF, word & 0xFFFF
            if version != VERSION:
                raise ProtocolError(f"control frame of SPDY version {version}, not {VERSION}")
            if length > self.max_control_length:
                raise ProtocolError(f"{_name(kind)} frame of {length} bytes is too long")
            if len(self._buf) < 8 + length:
                return out
            payload = bytes(self._buf[8:8 + length])
            del self._buf[:8 + length]
            out.append(_parse_control(kind, flags, payload))
