"""Test doubles for the streaming server: a backend whose "commands" are Python, an echo
server on loopback, and a raw SPDY client built on moorage's own framing."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from moorage.streaming.api import AttachRequest, BackendError, ExecRequest, Stdio, TerminalSize
from moorage.streaming.spdy import frames
from moorage.streaming.spdy.headers import Compressor, Decompressor, HeaderMap


@dataclass
class FakeBackend:
    """exec commands: ``echo WORDS``, ``cat`` (stdin to stdout), ``exit N``, ``big MIB``,
    ``fail``, ``forever`` (output until cancelled), ``sleep``, ``sizes`` (resizes to
    stdout), ``err TEXT`` (to stderr)."""

    echo_port: int = 0
    cancelled: list[str] = field(default_factory=list)
    written: dict[str, int] = field(default_factory=dict)
    sizes: list[TerminalSize] = field(default_factory=list)
    attached: list[AttachRequest] = field(default_factory=list)

    async def exec(self, req: ExecRequest, stdio: Stdio) -> int:
        cmd = req.cmd
        try:
            return await self._run(cmd, stdio)
        except asyncio.CancelledError:
            self.cancelled.append(cmd[0])
            raise

    async def _run(self, cmd: tuple[str, ...], stdio: Stdio) -> int:
        name = cmd[0]
        if name == "echo":
            assert stdio.stdout is not None
            await stdio.stdout.write(" ".join(cmd[1:]).encode() + b"\n")
            return 0
        if name == "err":
            assert stdio.stderr is not None
            await stdio.stderr.write(" ".join(cmd[1:]).encode())
            return 0
        if name == "cat":
            assert stdio.stdin is not None and stdio.stdout is not None
            while data := await stdio.stdin.read():
                await stdio.stdout.write(data)
            return 0
        if name == "exit":
            return int(cmd[1])
        if name == "fail":
            raise BackendError("no such command")
        if name == "big":
            assert stdio.stdout is not None
            chunk = b"\0" * (1 << 20)
            for _ in range(int(cmd[1])):
                await stdio.stdout.write(chunk)
            return 0
        if name == "forever":
            assert stdio.stdout is not None
            chunk = b"y" * 65536
            self.written[cmd[1]] = 0
            while True:
                await stdio.stdout.write(chunk)
                self.written[cmd[1]] += len(chunk)
        if name == "sleep":
            await asyncio.sleep(3600)
        if name == "sizes":
            assert stdio.resizes is not None and stdio.stdout is not None
            want = int(cmd[1])
            async for size in stdio.resizes:
                self.sizes.append(size)
                await stdio.stdout.write(f"{size.width}x{size.height}\n".encode())
                if len(self.sizes) == want:
                    break
            return 0
        raise BackendError(f"unknown fake command {name!r}")

    async def attach(self, req: AttachRequest, stdio: Stdio) -> None:
        self.attached.append(req)
        assert stdio.stdout is not None
        await stdio.stdout.write(b"attached\n")

    async def dial(self, sandbox_id: str, port: int) -> socket.socket:
        if sandbox_id != "pod" or port != 80:
            raise BackendError(f"dial tcp 127.0.0.1:{port}: connection refused")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.echo_port))
        return sock


async def echo_server() -> asyncio.Server:
    """A loopback server that answers each connection: ``echo:`` + what it read to EOF."""

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.read()
        w.write(b"echo:" + data)
        await w.drain()
        w.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


class RawSpdyClient:
    """Just enough of a SPDY client, from moorage's framing, to poke at the server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.parser = frames.FrameParser()
        self.comp, self.decomp = Compressor(), Decompressor()
        self.pending: list[frames.Frame] = []
        self.status = 0
        self.head = b""

    @classmethod
    async def connect(cls, url: str, protocols: list[str] | None = None,
                      upgrade: str = "SPDY/3.1") -> RawSpdyClient:
        parts = urlsplit(url)
        r, w = await asyncio.open_connection(parts.hostname, parts.port)
        lines = [f"POST {parts.path} HTTP/1.1", f"Host: {parts.netloc}",
                 "Connection: Upgrade", f"Upgrade: {upgrade}", "Content-Length: 0"]
        lines += [f"X-Stream-Protocol-Version: {p}" for p in protocols or []]
        w.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        c = cls(r, w)
        c.head = await r.readuntil(b"\r\n\r\n")
        c.status = int(c.head.split()[1])
        return c

    def header(self, name: str) -> list[str]:
        out = []
        for line in self.head.decode().split("\r\n")[1:]:
            k, _, v = line.partition(":")
            if k.lower() == name.lower():
                out.append(v.strip())
        return out

    def syn(self, sid: int, headers: dict[str, str], fin: bool = False) -> None:
        self.writer.write(frames.syn_stream(sid, self.comp.compress(headers), fin=fin))

    def send(self, raw: bytes) -> None:
        self.writer.write(raw)

    async def frame(self, timeout: float = 10) -> frames.Frame | None:
        """The next frame, DATA pieces joined; None at EOF."""
        buf = b""
        async with asyncio.timeout(timeout):
            while True:
                while self.pending:
                    f = self.pending.pop(0)
                    if isinstance(f, frames.Data):
                        buf += f.data
                        if not f.last:
                            continue
                        return frames.Data(f.stream_id, buf, f.fin, True)
                    return f
                chunk = await self.reader.read(65536)
                if not chunk:
                    return None
                self.pending += self.parser.feed(chunk)

    def headers_of(self, block: bytes) -> HeaderMap:
        return self.decomp.decompress(block)

    async def until_eof(self, timeout: float = 10) -> list[frames.Frame]:
        out = []
        while (f := await self.frame(timeout)) is not None:
            out.append(f)
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
