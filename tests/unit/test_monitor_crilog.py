"""The CRI log line format, byte for byte (moorage.monitor.crilog)."""

from __future__ import annotations

import re

import pytest

from moorage.monitor import crilog
from moorage.monitor.crilog import FULL, PARTIAL, STDERR, STDOUT, LineSplitter, entry, timestamp

TS = b"2016-10-06T00:17:09.669794202Z"
#: kubelet's parseCRILog, as a regex: timestamp, stream, tags (first is P or F), content.
CRI_LINE = re.compile(
    rb"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z) (stdout|stderr) ([PF])(?::[^ ]*)? (.*)\n\Z",
    re.S,
)


def lines(data: bytes) -> list[bytes]:
    return data.splitlines(keepends=True)


def parse(data: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """(stream, tag, content) of each entry; content without the runtime's newline of P."""
    out = []
    for line in lines(data):
        m = CRI_LINE.match(line)
        assert m, line
        content = m.group(4)
        if m.group(3) == b"F":
            content += b"\n"
        out.append((m.group(2), m.group(3), content))
    return out


def kubelet_view(data: bytes) -> bytes:
    """What kubelet prints for a log: F content with its newline, P content without."""
    out = b""
    for line in lines(data):
        m = CRI_LINE.match(line)
        assert m
        out += m.group(4) + (b"\n" if m.group(3) == b"F" else b"")
    return out


def test_timestamp_is_rfc3339_utc_with_nine_digits() -> None:
    assert timestamp(1475713029_669794202) == TS
    assert timestamp(0) == b"1970-01-01T00:00:00.000000000Z"
    assert timestamp(1475713029_000000001) == b"2016-10-06T00:17:09.000000001Z"
    # the cached per-second prefix follows the clock, backwards too
    assert timestamp(1475713030_000000005) == b"2016-10-06T00:17:10.000000005Z"
    assert timestamp(1475713029_669794202) == TS


def test_entry_bytes() -> None:
    assert entry(TS, STDOUT, FULL, b"log content 1\n") == TS + b" stdout F log content 1\n"
    assert entry(TS, STDERR, PARTIAL, b"part") == TS + b" stderr P part\n"
    assert entry(TS, STDOUT, FULL, b"\n") == TS + b" stdout F \n"


def test_full_lines_keep_their_bytes() -> None:
    s = LineSplitter(STDOUT, 16)
    out = s.feed(b"one\ntwo\r\n\n", TS)
    assert out == (TS + b" stdout F one\n" + TS + b" stdout F two\r\n" + TS + b" stdout F \n")
    assert s.pending == b""


def test_partial_line_waits_for_its_end() -> None:
    s = LineSplitter(STDERR, 16)
    assert s.feed(b"hel", TS, now=5) == b""
    assert s.pending == b"hel"
    assert s.pending_since == 5
    assert s.feed(b"lo", TS, now=9) == b""
    assert s.pending_since == 5  # the same line still waits
    assert s.feed(b"\nnext", TS, now=10) == TS + b" stderr F hello\n"
    assert s.pending == b"next"
    assert s.pending_since == 10  # a new partial line


def test_flush_writes_the_partial_line_as_p() -> None:
    s = LineSplitter(STDOUT, 16)
    s.feed(b"prompt> ", TS)
    assert s.flush(TS) == TS + b" stdout P prompt> \n"
    assert s.pending == b""
    assert s.pending_since == 0
    assert s.flush(TS) == b""


def test_long_line_is_split_into_p_chunks_of_max_then_f() -> None:
    s = LineSplitter(STDOUT, 4)
    out = s.feed(b"abcdefghij\n", TS)
    assert out == (TS + b" stdout P abcd\n" + TS + b" stdout P efgh\n" + TS + b" stdout F ij\n")


def test_line_of_exactly_max_bytes_is_one_f_entry() -> None:
    s = LineSplitter(STDOUT, 4)
    assert s.feed(b"abcd\n", TS) == TS + b" stdout F abcd\n"
    # max+1 bytes then the newline: one P of max bytes, then F with the rest
    assert s.feed(b"abcde\n", TS) == TS + b" stdout P abcd\n" + TS + b" stdout F e\n"


def test_a_full_chunk_waits_for_the_byte_that_says_whether_the_line_ends() -> None:
    s = LineSplitter(STDOUT, 4)
    assert s.feed(b"abcd", TS) == b""  # a '\n' next would make it F
    assert s.feed(b"e", TS) == TS + b" stdout P abcd\n"
    assert s.pending == b"e"


def test_split_does_not_depend_on_how_output_is_chunked() -> None:
    data = b"x" * 40960 + b"\nshort\n" + b"y" * 5 + b"\n" + b"tail"
    whole = LineSplitter(STDOUT, 16384)
    expected = whole.feed(data, TS) + whole.flush(TS)
    for size in (1, 7, 4096, 16384, 16385, 65536):
        s = LineSplitter(STDOUT, 16384)
        out = b"".join(s.feed(data[i : i + size], TS) for i in range(0, len(data), size))
        assert out + s.flush(TS) == expected, size
    tags = [(tag, len(content)) for _, tag, content in parse(expected)]
    assert tags == [(b"P", 16384), (b"P", 16384), (b"F", 8193), (b"F", 6), (b"F", 6), (b"P", 4)]
    assert kubelet_view(expected) == data


def test_every_entry_parses_as_kubelet_does() -> None:
    s = LineSplitter(STDERR, 8)
    data = b"a b  c\n\n\tx\x00y\x1b[0m tail end \r\n" + "é€".encode() * 5
    out = s.feed(data, TS) + s.flush(TS)
    for stream, _, _ in parse(out):
        assert stream == b"stderr"
    assert kubelet_view(out) == data


def test_empty_feed_and_bad_max() -> None:
    s = LineSplitter(STDOUT, 4)
    assert s.feed(b"", TS) == b""
    with pytest.raises(ValueError):
        LineSplitter(STDOUT, 0)
    assert crilog.DEFAULT_MAX_LINE == 16384
