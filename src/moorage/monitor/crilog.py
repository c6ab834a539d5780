"""The CRI container log format, as pure functions over bytes (no files, no sockets).

A log file holds one entry per line::

    2016-10-06T00:17:09.669794202Z stdout F log content 1\\n
    2016-10-06T00:17:09.669794203Z stderr P part of a long line\\n

``<timestamp> <stream> <tag> <content>``: the timestamp is RFC 3339 with nanoseconds (we write
UTC, ``Z``, always 9 fraction digits, so entries sort as text); the stream is ``stdout`` or
``stderr``; the tag is ``F`` for the last piece of a line (its content ends with the container's
own ``\\n``, kept byte for byte, ``\\r`` included) or ``P`` for a piece that the line goes on
after (the runtime adds a ``\\n``, which kubelet strips before joining ``P``... ``F``).

Splitting (:class:`LineSplitter`, one per stream):

- at each ``\\n`` the container writes: an ``F`` entry;
- a line with more than ``max_line`` bytes before its ``\\n`` becomes ``P`` entries of exactly
  ``max_line`` bytes, then an ``F`` entry with the rest;
- a partial line (no ``\\n`` yet) waits in the splitter, at most ``max_line`` bytes, until its
  ``\\n`` comes; :meth:`LineSplitter.flush` writes it as a ``P`` entry (the monitor does this at
  end of output and when it has waited a while), so the file holds exactly the bytes written:
  kubelet prints a ``P`` entry's content without a newline, as the container wrote it.
  containerd and conmon also write a trailing partial line as ``P``.

This module is imported by the monitor (before it forks per container) and by tests only.
"""

from __future__ import annotations

import time

STDOUT = b"stdout"
STDERR = b"stderr"
PARTIAL = b"P"
FULL = b"F"
#: containerd's ``max_container_log_line_size`` default.
DEFAULT_MAX_LINE = 16 * 1024

_second = -1
_prefix = b""


def timestamp(ns: int) -> bytes:
    """``ns`` (nanoseconds since the epoch) as ``YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ``."""
    global _second, _prefix
    sec, frac = divmod(ns, 1_000_000_000)
    if sec != _second:  # one strftime per second of output
        _prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec)).encode()
        _second = sec
    return b"%s%09dZ" % (_prefix, frac)


def entry(ts: bytes, stream: bytes, tag: bytes, content: bytes) -> bytes:
    """One log entry. ``content`` of an ``F`` entry ends with its ``\\n``; ``P`` gets one added."""
    if tag == PARTIAL:
        return b"%s %s P %s\n" % (ts, stream, content)
    return b"%s %s F %s" % (ts, stream, content)


class LineSplitter:
    """Turns one stream's output, chunk by chunk, into log entries."""

    __slots__ = ("max_line", "pending", "pending_since", "stream")

    def __init__(self, stream: bytes, max_line: int = DEFAULT_MAX_LINE) -> None:
        if max_line < 1:
            raise ValueError(f"max_line must be positive, not {max_line}")
        self.stream = stream
        self.max_line = max_line
        #: Bytes of a line whose ``\\n`` has not come yet (at most ``max_line``).
        self.pending = b""
        #: When ``pending`` became non-empty (the caller's clock; 0 when empty).
        self.pending_since = 0

    def feed(self, data: bytes, ts: bytes, now: int = 0) -> bytes:
        """The entries that ``data`` completes (possibly none), stamped ``ts``.

        ``now`` (any monotonic clock) is remembered as :attr:`pending_since` when a new
        partial line starts waiting.
        """
        if not data:
            return b""
        buf = self.pending + data if self.pending else data
        had_pending = bool(self.pending)
        limit = self.max_line
        n = len(buf)
        start = 0
        out = []
        while start < n:
            # A '\n' at start + limit still ends a line of exactly `limit` bytes: F.
            nl = buf.find(b"\n", start, start + limit + 1)
            if nl >= 0:
                out.append(entry(ts, self.stream, FULL, buf[start : nl + 1]))
                start = nl + 1
            elif n - start > limit:
                out.append(entry(ts, self.stream, PARTIAL, buf[start : start + limit]))
                start += limit
            else:
                break
        self.pending = buf[start:]
        if not self.pending:
            self.pending_since = 0
        elif start or not had_pending:
            self.pending_since = now  # a new partial line starts waiting
        return b"".join(out)

    def flush(self, ts: bytes) -> bytes:
        """The waiting partial line as a ``P`` entry (``b""`` if none)."""
        if not self.pending:
            return b""
        out = entry(ts, self.stream, PARTIAL, self.pending)
        self.pending = b""
        self.pending_since = 0
        return out
