"""SPDY/3 framing and header blocks, byte for byte, and against Go's spdystream framer.

The ``GO_FRAMES`` vectors were printed by ``tests/interop/spdyframes write`` (Go's
``spdy.Framer``, one compression context for all its header blocks, in order).
"""

from __future__ import annotations

import json
import subprocess
import zlib
from pathlib import Path

import pytest

from moorage.streaming.spdy import frames
from moorage.streaming.spdy.dictionary import DICTIONARY
from moorage.streaming.spdy.frames import FrameParser, ProtocolError
from moorage.streaming.spdy.headers import (
    Compressor,
    Decompressor,
    decode_block,
    encode_block,
)
from tests.interop.build import build, missing

GO_FRAMES = [bytes.fromhex(h) for h in (
    "80030001000000290000000100000000000078f9e3c6a7c26260606004a7b392a2d4c45c6851c29a0a0a6800000000ffff",
    "800300010000001700000003000000004000c22e555c92929907000000ffff",
    "800300020000000e000000016260606000000000ffff",
    "000000030000000668656c6c6f0a",
    "0000000301000000",
    "80030003000000080000000500000005",
    "800300060000000400000007",
    "80030007000000080000000300000000",
    "800300080000001300000003824a3356804b52862400000000ffff",
    "800300090000000800000003000003e8",
    "800300040000000c000000010100000700010000",
)]


def parse_all(data: bytes) -> list[frames.Frame]:
    return FrameParser().feed(data)


# -- encoding, byte for byte -------------------------------------------------------------


def test_data_frame_bytes() -> None:
    assert frames.data(3, b"hello\n") == GO_FRAMES[3]
    assert frames.data(3, b"", fin=True) == GO_FRAMES[4]
    assert frames.data(0x7FFFFFFF, b"x") == bytes.fromhex("7fffffff00000001") + b"x"


def test_control_frame_bytes() -> None:
    assert frames.rst_stream(5, frames.RstStatus.CANCEL) == GO_FRAMES[5]
    assert frames.ping(7) == GO_FRAMES[6]
    assert frames.goaway(3) == GO_FRAMES[7]
    assert frames.window_update(3, 1000) == GO_FRAMES[9]
    assert frames.settings(((1, 7, 65536),)) == GO_FRAMES[10]


def test_syn_stream_layout() -> None:
    raw = frames.syn_stream(3, b"BLOCK", associated_id=1, priority=2, slot=9, fin=True)
    assert raw[:4] == bytes.fromhex("80030001")  # control, version 3, SYN_STREAM
    assert raw[4] == frames.FLAG_FIN and int.from_bytes(raw[5:8], "big") == 15
    assert raw[8:16] == bytes.fromhex("0000000300000001")
    assert raw[16:18] == bytes((2 << 5, 9)) and raw[18:] == b"BLOCK"


def test_encoders_refuse_bad_ids_and_sizes() -> None:
    with pytest.raises(ValueError):
        frames.data(0, b"")
    with pytest.raises(ValueError):
        frames.data(1 << 31, b"")
    with pytest.raises(ValueError):
        frames.data(1, bytes(frames.MAX_LENGTH + 1))


# -- parsing Go's frames -------------------------------------------------------------------


def test_parse_go_frames_with_one_decompression_context() -> None:
    parsed = parse_all(b"".join(GO_FRAMES))
    d = Decompressor()
    syn1, syn3, reply, data, fin, rst, ping, goaway, hdrs, window, settings = parsed
    assert isinstance(syn1, frames.SynStream) and syn1.stream_id == 1
    assert d.decompress(syn1.header_block) == {"streamtype": ["error"]}
    assert isinstance(syn3, frames.SynStream) and syn3.priority == 2
    assert d.decompress(syn3.header_block) == {"streamtype": ["stdin"]}
    assert isinstance(reply, frames.SynReply) and d.decompress(reply.header_block) == {}
    assert data == frames.Data(3, b"hello\n", fin=False, last=True)
    assert fin == frames.Data(3, b"", fin=True, last=True)
    assert rst == frames.RstStream(5, frames.RstStatus.CANCEL)
    assert ping == frames.Ping(7)
    assert goaway == frames.GoAway(3, frames.GoAwayStatus.OK)
    assert isinstance(hdrs, frames.Headers)
    assert d.decompress(hdrs.header_block) == {"x": ["a", "b"]}
    assert window == frames.WindowUpdate(3, 1000)
    assert settings == frames.Settings(((1, 7, 65536),))


def test_parser_is_incremental_byte_by_byte() -> None:
    stream = b"".join(GO_FRAMES)
    whole = parse_all(stream)
    parser = FrameParser()
    pieces: list[frames.Frame] = []
    for i in range(len(stream)):
        pieces += parser.feed(stream[i:i + 1])
    # DATA payloads come in pieces as they arrive; everything else whole.
    joined: list[frames.Frame] = []
    buf = b""
    for f in pieces:
        if isinstance(f, frames.Data):
            buf += f.data
            if f.last:
                joined.append(frames.Data(f.stream_id, buf, f.fin, True))
                buf = b""
        else:
            joined.append(f)
    assert joined == whole
    partial = [f for f in pieces if isinstance(f, frames.Data) and not f.last]
    assert partial and all(not f.fin for f in partial)


def test_large_data_frame_is_never_buffered_whole() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    raw = frames.data(9, payload, fin=True)
    parser = FrameParser()
    got = b""
    seen_fin = False
    for off in range(0, len(raw), 65536):
        for f in parser.feed(raw[off:off + 65536]):
            assert isinstance(f, frames.Data) and len(f.data) <= 65536
            got += f.data
            seen_fin = f.fin
    assert got == payload and seen_fin


@pytest.mark.parametrize("raw, message", [
    (bytes.fromhex("8002000100000000"), "version 2"),
    (bytes.fromhex("0000000000000001") + b"x", "stream id 0"),
    (bytes.fromhex("8003000100000004") + bytes(4), "too short"),
    (bytes.fromhex("800300030000000800000000" + "00000001"), "stream id 0"),
    (bytes.fromhex("8003000400000008") + bytes.fromhex("00000002") + bytes(4), "entries"),
])
def test_protocol_errors(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_all(raw)


def test_control_frames_are_bounded() -> None:
    parser = FrameParser(max_control_length=100)
    with pytest.raises(ProtocolError, match="too long"):
        parser.feed(bytes.fromhex("8003000100000065"))  # 101 bytes announced


def test_unknown_control_frames_are_kept_as_unknown() -> None:
    raw = bytes.fromhex("8003000a00000003") + b"abc"
    assert parse_all(raw) == [frames.UnknownControl(10, 0, b"abc")]


# -- header blocks -------------------------------------------------------------------------


def test_block_layout() -> None:
    raw = encode_block({"Streamtype": "stdout", "x": ["a", "b"]})
    assert raw == (b"\x00\x00\x00\x02" + b"\x00\x00\x00\nstreamtype" + b"\x00\x00\x00\x06stdout"
                   + b"\x00\x00\x00\x01x" + b"\x00\x00\x00\x03a\x00b")
    assert decode_block(raw) == {"streamtype": ["stdout"], "x": ["a", "b"]}
    assert decode_block(b"\x00\x00\x00\x00") == {}


@pytest.mark.parametrize("raw", [
    b"", b"\x00\x00\x00\x01", b"\x00\x00\x00\x01\x00\x00\x00\x05ab",
    b"\x00\x00\x00\x00extra", b"\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00",
    b"\xff\xff\xff\xff",
])
def test_bad_blocks(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_block(raw)


def test_one_compression_context_per_direction() -> None:
    c, d = Compressor(), Decompressor()
    blocks = [{"streamtype": "error"}, {"streamtype": "stdin", "port": "80"}, {},
              {"streamtype": "error"}]
    wire = [c.compress(b) for b in blocks]
    assert all(w.endswith(b"\x00\x00\xff\xff") for w in wire)  # sync flush per block
    assert len(wire[3]) < len(wire[0])  # the context remembers: the repeat is cheaper
    for b, w in zip(blocks, wire, strict=True):
        assert d.decompress(w) == {k: [v] for k, v in b.items()}
    # A fresh context cannot read the second block on its own.
    with pytest.raises(ProtocolError):
        Decompressor().decompress(wire[1])


def test_decompression_is_bounded() -> None:
    z = zlib.compressobj(9, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY, DICTIONARY)
    bomb = z.compress(encode_block({"x": "a" * 5_000_000})) + z.flush(zlib.Z_SYNC_FLUSH)
    assert len(bomb) < 10_000
    with pytest.raises(ProtocolError, match="expands"):
        Decompressor().decompress(bomb)


def test_garbage_does_not_decompress() -> None:
    with pytest.raises(ProtocolError):
        Decompressor().decompress(b"not zlib at all")


# -- against the Go framer, live -----------------------------------------------------------


@pytest.fixture(scope="module")
def go_frames(tmp_path_factory: pytest.TempPathFactory) -> Path:
    why = missing()
    if why:
        pytest.skip(why)
    return build("spdyframes", tmp_path_factory.mktemp("go"))


def test_go_writes_the_vectors(go_frames: Path) -> None:
    out = subprocess.run([go_frames, "write"], capture_output=True, check=True, timeout=60)
    assert [bytes.fromhex(h.decode()) for h in out.stdout.split()] == GO_FRAMES


def test_go_reads_what_we_write(go_frames: Path) -> None:
    c = Compressor()
    wire = b"".join([
        frames.syn_stream(1, c.compress({"streamtype": "error", "port": "8080"})),
        frames.syn_reply(1, c.compress({})),
        frames.data(1, b"payload", fin=True),
        frames.headers(1, c.compress({"a": ["1", "2"]})),
        frames.rst_stream(1, frames.RstStatus.PROTOCOL_ERROR),
        frames.ping(4),
        frames.goaway(1, frames.GoAwayStatus.INTERNAL_ERROR),
    ])
    out = subprocess.run([go_frames, "read"], input=wire, capture_output=True, check=True,
                         timeout=60)
    got = [json.loads(line) for line in out.stdout.splitlines()]
    assert got == [
        {"type": "SynStreamFrame", "stream_id": 1, "flags": 0,
         "headers": {"Streamtype": ["error"], "Port": ["8080"]}},
        {"type": "SynReplyFrame", "stream_id": 1, "flags": 0, "headers": {}},
        {"type": "DataFrame", "stream_id": 1, "data": "payload", "flags": 1},
        {"type": "HeadersFrame", "stream_id": 1, "flags": 0, "headers": {"A": ["1", "2"]}},
        {"type": "RstStreamFrame", "stream_id": 1, "status": 1},
        {"type": "PingFrame", "id": 4},
        {"type": "GoAwayFrame", "last_good_stream_id": 1, "status": 2},
    ]
