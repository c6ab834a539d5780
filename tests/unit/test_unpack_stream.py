"""The unpacker's layer stream: decompression, diff_id, size bound. No root needed."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct

import pytest
import zstandard

from moorage.image.unpack.rules import LayerError
from moorage.image.unpack.stream import (
    Compression,
    LayerStream,
    ZstdReader,
    open_source,
)

DATA = b"".join(i.to_bytes(4, "big") for i in range(300_000))  # 1.2 MB, compressible
#: A zstd skippable frame, as zstd:chunked appends its table of contents in one.
SKIPPABLE = struct.pack("<II", 0x184D2A50, 5) + b"hello"


def _compress(data: bytes, compression: Compression) -> bytes:
    if compression == "gzip":
        return gzip.compress(data)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def _read_all(layer: LayerStream, size: int = 65536) -> bytes:
    parts = []
    while chunk := layer.read(size):
        assert len(chunk) <= size
        parts.append(chunk)
    return b"".join(parts)


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_stream_hashes_and_counts_uncompressed_bytes(compression: Compression) -> None:
    raw = io.BytesIO(_compress(DATA, compression))
    layer = LayerStream(open_source(raw, compression), compression, None)
    assert _read_all(layer) == DATA
    assert layer.size == len(DATA)
    assert layer.diff_id == "sha256:" + hashlib.sha256(DATA).hexdigest()


def test_drain_covers_the_rest() -> None:
    layer = LayerStream(open_source(io.BytesIO(DATA), "none"), "none", None)
    layer.read(100)
    layer.drain()
    assert layer.size == len(DATA)
    assert layer.diff_id == "sha256:" + hashlib.sha256(DATA).hexdigest()


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_max_size(compression: Compression) -> None:
    raw = io.BytesIO(_compress(DATA, compression))
    layer = LayerStream(open_source(raw, compression), compression, len(DATA) - 1)
    with pytest.raises(LayerError, match=f"larger than the limit of {len(DATA) - 1}"):
        _read_all(layer)


def test_max_size_exactly_reached_is_fine() -> None:
    layer = LayerStream(open_source(io.BytesIO(DATA), "none"), "none", len(DATA))
    assert _read_all(layer) == DATA


@pytest.mark.parametrize(
    ("compression", "blob", "reason"),
    [
        ("gzip", gzip.compress(DATA)[:-100], "corrupt or truncated gzip stream"),
        ("gzip", gzip.compress(DATA)[:-4], "corrupt or truncated gzip stream"),
        ("gzip", b"this is not gzip at all" * 10, "corrupt or truncated gzip stream"),
        ("gzip", gzip.compress(DATA) + b"junk", "corrupt or truncated gzip stream"),
        ("zstd", zstandard.ZstdCompressor().compress(DATA)[:-1], "truncated zstd stream"),
        ("zstd", zstandard.ZstdCompressor().compress(DATA)[:100], "truncated zstd stream"),
        ("zstd", b"this is not zstd at all" * 10, "corrupt or truncated zstd stream"),
        ("zstd", zstandard.ZstdCompressor().compress(DATA) + b"junk", "corrupt or truncated"),
    ],
)
def test_corrupt_input(compression: Compression, blob: bytes, reason: str) -> None:
    layer = LayerStream(open_source(io.BytesIO(blob), compression), compression, None)
    with pytest.raises(LayerError, match=reason):
        _read_all(layer)


def test_gzip_members_and_zero_padding() -> None:
    blob = gzip.compress(DATA[:1000]) + gzip.compress(DATA[1000:]) + bytes(16)
    layer = LayerStream(open_source(io.BytesIO(blob), "gzip"), "gzip", None)
    assert _read_all(layer) == DATA


@pytest.mark.parametrize(
    "frames",
    [
        [DATA],
        [DATA[:1000], DATA[1000:]],
        [DATA, SKIPPABLE],
        [SKIPPABLE, DATA],
        [DATA[:5], SKIPPABLE, DATA[5:], SKIPPABLE],
    ],
)
def test_zstd_frames(frames: list[bytes]) -> None:
    cctx = zstandard.ZstdCompressor()
    blob = b"".join(f if f is SKIPPABLE else cctx.compress(f) for f in frames)
    expected = b"".join(f for f in frames if f is not SKIPPABLE)
    assert _read_all(LayerStream(ZstdReader(io.BytesIO(blob)), "zstd", None)) == expected


def test_zstd_frame_without_content_size() -> None:
    blob = zstandard.ZstdCompressor(write_content_size=False).compress(DATA)
    assert _read_all(LayerStream(ZstdReader(io.BytesIO(blob)), "zstd", None)) == DATA


def test_zstd_reader_reads_small_pieces_of_a_bomb() -> None:
    # 64 MiB of zeros compress to a few KiB; reads stay as small as asked.
    cobj = zstandard.ZstdCompressor().compressobj()
    zeros = bytes(1 << 20)
    blob = b"".join(cobj.compress(zeros) for _ in range(64)) + cobj.flush()
    assert len(blob) < 64 * 1024
    reader = ZstdReader(io.BytesIO(blob))
    total = 0
    while chunk := reader.read(4096):
        assert len(chunk) <= 4096
        total += len(chunk)
    assert total == 64 << 20


def test_empty_input_is_an_empty_stream() -> None:
    for compression in ("gzip", "zstd", "none"):
        layer = LayerStream(open_source(io.BytesIO(b""), compression), compression, None)
        assert layer.read(512) == b""
