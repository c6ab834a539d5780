"""The uncompressed layer stream: decompression, the diff_id hash and the size bound.

gzip uses isal (about 2.4x zlib) and falls back to the stdlib; zstd uses zstandard with
every frame checked for completion (its stream reader ends quietly on truncated input).
"""

from __future__ import annotations

import gzip
import hashlib
from typing import TYPE_CHECKING, Literal, Protocol

from moorage.image.unpack.rules import LayerError, LayerLimitError

if TYPE_CHECKING:
    import zstandard

_GzipFile: type[gzip.GzipFile]
try:
    from isal import igzip

    _GzipFile = igzip.IGzipFile
except ImportError:  # pragma: no cover - isal is a dependency; the fallback is for odd builds
    _GzipFile = gzip.GzipFile

Compression = Literal["gzip", "zstd", "none"]
COMPRESSIONS: tuple[Compression, ...] = ("gzip", "zstd", "none")

#: Compressed bytes read from the source at a time.
READ_CHUNK = 1 << 17
#: Compressed bytes given to the zstd decoder per call. A zstd block of 128 KiB can be encoded
#: in 4 bytes, so this bounds one call's output to 64 MiB however hostile the input.
ZSTD_FEED = 1 << 11


class Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


class RawLayer(Readable, Protocol):
    """The compressed input (stdin). gzip's reader wants ``seek`` but never calls it."""

    def seek(self, offset: int, /) -> object: ...


class ZstdReader:
    """Decompresses concatenated zstd frames (skippable ones included) with bounded output.

    Input that ends inside a frame is an error, not an early end.
    """

    def __init__(self, raw: Readable) -> None:
        # Imported here, not for every gzip layer (the helper imports everything it needs
        # before it chroots, so this runs before the chroot too).
        import zstandard

        self._raw = raw
        self._dctx: zstandard.ZstdDecompressor = zstandard.ZstdDecompressor()
        self._frame = self._dctx.decompressobj()
        self._in_frame = False  # the current frame has been fed bytes and is not finished
        self._pending = memoryview(b"")  # compressed bytes not yet fed
        self._carry = b""  # bytes past the end of the last frame, fed first
        self._out = b""
        self._pos = 0

    def read(self, size: int, /) -> bytes:
        while self._pos >= len(self._out):
            if not self._decode_more():
                return b""
        data = self._out[self._pos : self._pos + size]
        self._pos += len(data)
        return data

    def _decode_more(self) -> bool:
        """Decode until there is output; False at a clean end of input."""
        while True:
            piece = self._next_piece()
            if piece is None:
                if self._in_frame:
                    raise LayerError("truncated zstd stream: input ends inside a frame")
                return False
            out = self._frame.decompress(piece)
            self._in_frame = True
            if self._frame.eof:
                self._carry = self._frame.unused_data
                self._frame = self._dctx.decompressobj()
                self._in_frame = False
            if out:
                self._out, self._pos = out, 0
                return True

    def _next_piece(self) -> bytes | memoryview | None:
        if self._carry:
            carry, self._carry = self._carry, b""
            return carry
        if not self._pending:
            chunk = self._raw.read(READ_CHUNK)
            if not chunk:
                return None
            self._pending = memoryview(chunk)
        piece, self._pending = self._pending[:ZSTD_FEED], self._pending[ZSTD_FEED:]
        return piece


def open_source(raw: RawLayer, compression: Compression) -> Readable:
    """A reader of the uncompressed tar stream inside ``raw``."""
    if compression == "gzip":
        return _GzipFile(fileobj=raw, mode="rb")
    if compression == "zstd":
        return ZstdReader(raw)
    if compression == "none":
        return raw
    raise ValueError(f"unknown compression {compression!r}")


class LayerStream:
    """The uncompressed tar stream as tarfile reads it, hashed and counted on the way.

    Decoder failures become :class:`LayerError`; so does passing ``max_size``.
    Only ``read`` is meaningful: the other methods exist for tarfile's file protocol.
    """

    def __init__(self, source: Readable, compression: Compression, max_size: int | None) -> None:
        self._source = source
        self._compression = compression
        self._max_size = max_size
        self._sha256 = hashlib.sha256()
        self.size = 0

    @property
    def diff_id(self) -> str:
        return f"sha256:{self._sha256.hexdigest()}"

    def read(self, size: int, /) -> bytes:
        try:
            data = self._source.read(size)
        except LayerError:
            raise
        except Exception as e:
            what = "layer" if self._compression == "none" else self._compression
            raise LayerError(f"corrupt or truncated {what} stream: {e}") from None
        if data:
            self._sha256.update(data)
            self.size += len(data)
            if self._max_size is not None and self.size > self._max_size:
                raise LayerLimitError(
                    f"layer is larger than the limit of {self._max_size} uncompressed bytes "
                    "(max_layer_size)"
                )
        return data

    def drain(self) -> None:
        """Read to the end, so that the hash and size cover trailing blocks and padding."""
        while self.read(READ_CHUNK):
            pass

    def tell(self) -> int:
        return self.size

    def write(self, b: bytes, /) -> object:
        raise OSError("the layer stream is read-only")

    def seek(self, pos: int, /) -> object:
        raise OSError("the layer stream cannot seek")

    def close(self) -> object:
        return None
