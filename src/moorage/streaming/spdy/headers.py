"""SPDY/3 header blocks: the name/value layout and its zlib compression. No I/O.

Uncompressed, a block is ``u32 count`` then, per pair, ``u32 length, name`` (lower case)
and ``u32 length, value``, where several values of one name are joined by NUL. Each
direction of a connection has one zlib context primed with the SPDY dictionary for all
its blocks, each block ending with a sync flush; so blocks must be compressed in the order
they are sent and decompressed in the order they arrive, every one of them (also those of
frames that are otherwise ignored).
"""

from __future__ import annotations

import struct
import zlib

from moorage.streaming.spdy.dictionary import DICTIONARY
from moorage.streaming.spdy.frames import ProtocolError

#: Limits on what a peer may send (spdystream allows 1000 headers and 1 MiB per field).
MAX_HEADERS = 1000
MAX_BLOCK = 1 << 20

HeaderMap = dict[str, list[str]]

_U32 = struct.Struct(">I")


def encode_block(headers: HeaderMap | dict[str, str]) -> bytes:
    """The uncompressed block of ``headers`` (names lower-cased, in the given order)."""
    out = bytearray(_U32.pack(len(headers)))
    for name, value in headers.items():
        values = [value] if isinstance(value, str) else value
        raw_name = name.lower().encode("utf-8")
        raw_value = b"\0".join(v.encode("utf-8") for v in values)
        out += _U32.pack(len(raw_name)) + raw_name + _U32.pack(len(raw_value)) + raw_value
    return bytes(out)


def decode_block(raw: bytes) -> HeaderMap:
    """The headers of an uncompressed block; :class:`ProtocolError` if it is malformed."""
    if len(raw) < 4:
        raise ProtocolError("header block is shorter than its count")
    count = _U32.unpack_from(raw)[0]
    if count > MAX_HEADERS:
        raise ProtocolError(f"header block has {count} headers (at most {MAX_HEADERS})")
    pos = 4
    out: HeaderMap = {}

    def field() -> bytes:
        nonlocal pos
        if pos + 4 > len(raw):
            raise ProtocolError("header block is truncated")
        n = _U32.unpack_from(raw, pos)[0]
        pos += 4
        if pos + n > len(raw):
            raise ProtocolError("header block is truncated")
        value = raw[pos:pos + n]
        pos += n
        return value

    for _ in range(count):
        name = field().decode("utf-8", "replace").lower()
        if not name:
            raise ProtocolError("header block has an empty name")
        values = field().decode("utf-8", "replace").split("\0")
        out.setdefault(name, []).extend(values)
    if pos != len(raw):
        raise ProtocolError(f"header block has {len(raw) - pos} bytes after its headers")
    return out


class Compressor:
    """The sending direction's zlib context."""

    def __init__(self, level: int = zlib.Z_DEFAULT_COMPRESSION) -> None:
        self._z = zlib.compressobj(level, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY,
                                   DICTIONARY)

    def compress(self, headers: HeaderMap | dict[str, str]) -> bytes:
        return self._z.compress(encode_block(headers)) + self._z.flush(zlib.Z_SYNC_FLUSH)


class Decompressor:
    """The receiving direction's zlib context, bounded to :data:`MAX_BLOCK` per block."""

    def __init__(self, max_block: int = MAX_BLOCK) -> None:
        self.max_block = max_block
        self._z = zlib.decompressobj(zdict=DICTIONARY)

    def decompress(self, block: bytes) -> HeaderMap:
        try:
            raw = self._z.decompress(block, self.max_block + 1)
        except zlib.error as e:
            raise ProtocolError(f"header block does not decompress: {e}") from None
        if len(raw) > self.max_block or self._z.unconsumed_tail:
            raise ProtocolError(f"header block expands past {self.max_block} bytes")
        return decode_block(raw)
