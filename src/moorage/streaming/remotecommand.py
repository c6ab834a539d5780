"""The remote-command protocol (exec and attach) over SPDY streams or WebSocket channels.

Versions, as client-go and the reference server (kubernetes cri-streaming) name them:

===========================  =================================================================
``channel.k8s.io``           v1: streams error, stdin, stdout, stderr; errors as plain text
``v2.channel.k8s.io``        v2: the same streams, fixed half-close handling
``v3.channel.k8s.io``        v3: adds the ``resize`` stream (tty)
``v4.channel.k8s.io``        v4: the error stream carries a JSON ``metav1.Status``, exit code
``v5.channel.k8s.io``        v5 (WebSocket only): v4 plus the CLOSE signal (stdin EOF)
===========================  =================================================================

Over SPDY the client opens one stream per channel, named by its ``streamtype`` header; the
session starts when all the streams the request implies are there (at most
``creation_timeout`` after the upgrade). Over WebSocket the channels are numbered: 0 stdin,
1 stdout, 2 stderr, 3 error, 4 resize; an empty message on the lowest output channel tells
the client the session is ready.

When the command is done: stdout and stderr are closed, the status goes on the error
stream, every stream is closed, and the connection ends (SPDY GOAWAY, WebSocket close). A
client that goes away ends the session at once, which kills an exec'd command.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from moorage import log
from moorage.streaming.api import BackendError, Reader, Stdio, TerminalSize, Writer
from moorage.streaming.spdy.connection import SpdyConnection, SpdyStream
from moorage.streaming.websocket import WsConnection

_log = log.get("moorage.streaming")

V1 = "channel.k8s.io"
V2 = "v2.channel.k8s.io"
V3 = "v3.channel.k8s.io"
V4 = "v4.channel.k8s.io"
V5 = "v5.channel.k8s.io"
V1_BASE64 = "base64.channel.k8s.io"
V4_BASE64 = "v4.base64.channel.k8s.io"

#: SPDY versions we speak, the newest first (the 403's X-Accepted-Stream-Protocol-Versions).
SPDY_PROTOCOLS = [V4, V3, V2, V1]
#: WebSocket subprotocols we speak. A client that names none gets binary v1 semantics.
WEBSOCKET_PROTOCOLS = [V5, V4, V4_BASE64, V1, V1_BASE64]

STDIN, STDOUT, STDERR, ERROR, RESIZE = range(5)
STREAM_TYPES = ("error", "stdin", "stdout", "stderr", "resize")
#: Bytes of one pending resize message kept before the resize stream is dropped.
MAX_RESIZE_MESSAGE = 4096

Runner = Callable[[Stdio], Awaitable[int | None]]


def version_of(protocol: str) -> int:
    """The protocol version number (1 for ``channel.k8s.io`` and the base64 variant)."""
    if protocol.startswith("v") and "." in protocol:
        return int(protocol[1:protocol.index(".")])
    return 1


# -- status ----------------------------------------------------------------------------------


def _status(doc: dict[str, Any]) -> bytes:
    return json.dumps({"metadata": {}, **doc}, separators=(",", ":")).encode()


def status_success() -> bytes:
    return _status({"status": "Success"})


def status_exit_code(code: int, cmd: tuple[str, ...] = ()) -> bytes:
    """v4's non-zero exit: reason NonZeroExitCode, the code as the ExitCode cause."""
    what = (f"error executing command [{' '.join(cmd)}], exit code {code}" if cmd
            else f"exit code {code}")
    return _status({
        "status": "Failure",
        "message": f"command terminated with non-zero exit code: {what}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
    })


def status_error(message: str) -> bytes:
    """v4's InternalError status (HTTP 500), as apierrors.NewInternalError."""
    return _status({
        "status": "Failure",
        "message": f"Internal error occurred: {message}",
        "reason": "InternalError",
        "details": {"causes": [{"message": message}]},
        "code": 500,
    })


def status_bytes(version: int, code: int | None, error: str | None,
                 cmd: tuple[str, ...] = ()) -> bytes:
    """What goes on the error stream at the end: v4+ JSON always; v1-v3 text on failure."""
    if error is not None:
        return status_error(error) if version >= 4 else error.encode()
    if code:
        if version >= 4:
            return status_exit_code(code, cmd)
        return f"command terminated with non-zero exit code: exit code {code}".encode()
    return status_success() if version >= 4 else b""


# -- resize ----------------------------------------------------------------------------------


class ResizeDecoder:
    """Terminal sizes from a byte stream of concatenated JSON objects ``{"Width","Height"}``
    (Go's json.Encoder output, one object per resize)."""

    def __init__(self) -> None:
        self._buf = ""
        self._json = json.JSONDecoder()

    def feed(self, data: bytes) -> list[TerminalSize]:
        self._buf += data.decode("utf-8", "replace")
        out: list[TerminalSize] = []
        while True:
            text = self._buf.lstrip()
            if not text:
                self._buf = ""
                return out
            try:
                obj, end = self._json.raw_decode(text)
            except RecursionError:
                raise ValueError("resize message nests too deep") from None
            except ValueError:
                if len(text) > MAX_RESIZE_MESSAGE:
                    raise ValueError("resize message is not JSON") from None
                self._buf = text
                return out
            self._buf = text[end:]
            if isinstance(obj, dict):
                size = _size(obj)
                if size is not None:
                    out.append(size)


def _size(obj: dict[str, Any]) -> TerminalSize | None:
    width, height = obj.get("Width", obj.get("width")), obj.get("Height", obj.get("height"))
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (width, height)):
        return None
    assert isinstance(width, int) and isinstance(height, int)
    if not (0 <= width < 65536 and 0 <= height < 65536):
        return None
    return TerminalSize(width=width, height=height)


async def resize_events(reader: Reader) -> AsyncIterator[TerminalSize]:
    decoder = ResizeDecoder()
    while data := await reader.read():
        try:
            sizes = decoder.feed(data)
        except ValueError:
            _log.info("streaming.bad_resize")
            return
        for size in sizes:
            yield size


# -- the session ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool
    cmd: tuple[str, ...] = ()  # for the status message of exec


async def _session(run: Runner, stdio: Stdio, error: Writer | None, version: int,
                   lost: asyncio.Event, opts: Options) -> str:
    """Run the backend until it ends or the client goes; finish the streams. An outcome
    word for the log."""
    task = asyncio.ensure_future(run(stdio))
    gone = asyncio.ensure_future(lost.wait())
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if task.cancelled():
        return "client gone"
    code: int | None = None
    message: str | None = None
    exc = task.exception()
    if isinstance(exc, BackendError):
        message = str(exc)
    elif exc is not None:
        _log.error("streaming.backend_failed", error=repr(exc))
        message = f"error executing command in container: {exc}"
    else:
        code = task.result()
    for out in (stdio.stdout, stdio.stderr):
        if out is not None:
            await out.close()
    if error is not None:
        data = status_bytes(version, code, message, opts.cmd)
        if data:
            await error.write(data)
        await error.close()
    return "failed" if message else f"exit {code}" if code is not None else "done"


async def serve_spdy(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    protocol: str,
    opts: Options,
    run: Runner,
    *,
    initial: bytes = b"",
    creation_timeout: float = 30.0,
    idle_timeout: float | None = None,
) -> str:
    """One remote-command session on an upgraded SPDY connection (the 101 is sent)."""
    version = version_of(protocol)
    expected = {"error"}
    for name, wanted in (("stdin", opts.stdin), ("stdout", opts.stdout),
                         ("stderr", opts.stderr), ("resize", opts.tty and version >= 3)):
        if wanted:
            expected.add(name)
    streams: dict[str, SpdyStream] = {}
    ready = asyncio.Event()
    refused: list[str] = []

    def on_stream(stream: SpdyStream) -> bool:
        kind = stream.header("streamtype")
        if kind not in STREAM_TYPES:
            refused.append(kind)
            ready.set()
            return False
        if kind not in expected or kind in ("error", "stdout", "stderr"):
            stream.discard_input()  # we only write these (or nobody asked for it)
        streams.setdefault(kind, stream)
        if expected <= streams.keys():
            ready.set()
        return True

    conn = SpdyConnection(reader, writer, on_stream, initial=initial,
                          idle_timeout=idle_timeout)
    reading = asyncio.ensure_future(conn.run())
    try:
        outcome = await _wait_ready(ready, conn.lost, creation_timeout)
        if outcome is None and refused:
            outcome = f"unexpected stream type {refused[0]!r}"
        if outcome is not None:
            return outcome
        stdio = Stdio(
            stdin=streams["stdin"] if opts.stdin else None,
            stdout=streams["stdout"] if opts.stdout else None,
            stderr=streams["stderr"] if opts.stderr else None,
            resizes=resize_events(streams["resize"]) if "resize" in expected else None,
            tty=opts.tty,
        )
        return await _session(run, stdio, streams["error"], version, conn.lost, opts)
    finally:
        for stream in list(conn.streams.values()):
            with contextlib.suppress(Exception):
                await stream.close()
        await conn.close()
        reading.cancel()
        with contextlib.suppress(BaseException):
            await reading


async def _wait_ready(ready: asyncio.Event, lost: asyncio.Event, timeout: float) -> str | None:
    """None once the streams are there; else why not."""
    waiters = [asyncio.ensure_future(ready.wait()), asyncio.ensure_future(lost.wait())]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
    if ready.is_set():
        return None
    if lost.is_set():
        return "client gone before its streams"
    return "timed out waiting for the client's streams"


async def serve_websocket(
    conn: WsConnection,
    protocol: str,
    opts: Options,
    run: Runner,
) -> str:
    """One remote-command session on an accepted WebSocket (``protocol`` may be "")."""
    version = version_of(protocol) if protocol else 1
    stdin = conn.input(STDIN) if opts.stdin else None
    resize = conn.input(RESIZE) if opts.tty else None
    stdout = conn.output(STDOUT) if opts.stdout else None
    stderr = conn.output(STDERR) if opts.stderr else None
    error = conn.output(ERROR)
    reading = asyncio.ensure_future(conn.run())
    try:
        # An empty message on the lowest output channel: the client may start.
        await conn.send(STDOUT if opts.stdout else STDERR if opts.stderr else ERROR, b"")
        stdio = Stdio(stdin=stdin, stdout=stdout, stderr=stderr,
                      resizes=resize_events(resize) if resize is not None else None,
                      tty=opts.tty)
        return await _session(run, stdio, error, version, conn.lost, opts)
    finally:
        await conn.close()
        reading.cancel()
        with contextlib.suppress(BaseException):
            await reading
